"""Step configs and their handlers. A technique registers one handler per config class (one per
scheme); the runner looks the handler of a parsed config up here and knows nothing else about it."""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.spec.configs import StepConfig
from worker.engine.data import ImageSet
from modelpress.spec.errors import EngineError

# Modules that register handlers when imported; one per technique.
TECHNIQUE_MODULES = ("worker.engine.quantize", "worker.engine.prune", "worker.engine.distill")

ProgressFn = Callable[[str, float], None]


@dataclass
class StepContext:
    model_path: Path  # the ONNX model this step starts from (the previous step's output)
    original_path: Path  # the job's original model, as ONNX (a teacher, a reference)
    workdir: Path
    data: dict[str, ImageSet]  # by role: calibration, train, eval
    progress: ProgressFn  # (stage, fraction of this step in 0..1)
    # Another uploaded model of the job's tenant, as ONNX (a teacher or student by id).
    load_model: Callable[[str], Path] | None = None
    # Where a training step keeps its checkpoint so a re-delivered job resumes (training.Checkpoints).
    checkpoints: Any = None
    # The job's task (None: inferred from the outputs) and safety floor. A step that can search
    # (static_int8's repair ladder) judges its candidates by them. The runner passes the job's
    # ("default" when the job gives none); a direct caller of a handler opts in.
    task: dict | None = None
    floor: Any = "off"


@dataclass
class StepResult:
    model_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    # Extra files of the final step, stored under these names beside model.onnx (model.onnx.zst).
    artifacts: dict[str, Path] = field(default_factory=dict)
    # Named outputs a later step reads, each a file `beside(model_path, name)` (a prune step's
    # channel statistics); the runner keeps them with the step's checkpoint.
    outputs: dict[str, Path] = field(default_factory=dict)
    # The technique's own measurements of the final model on the evaluation images, merged into
    # the job's evaluation (per-layer SQNR of a quantized model).
    measure: Callable[[Any], dict] | None = None


def beside(model_path: Path, name: str) -> Path:
    """Where a step's named output `name` lies: next to its model, `<model stem>.<name>`."""
    return model_path.with_name(f"{model_path.stem}.{name}")


StepHandler = Callable[[StepConfig, StepContext], StepResult]
_HANDLERS: dict[type[StepConfig], StepHandler] = {}


def register(*config_classes: type[StepConfig]) -> Callable[[StepHandler], StepHandler]:
    def decorate(handler: StepHandler) -> StepHandler:
        for config_class in config_classes:
            _HANDLERS[config_class] = handler
        return handler

    return decorate


def handler_for(config: StepConfig) -> StepHandler:
    for module in TECHNIQUE_MODULES:  # imported once; later calls find them in sys.modules
        importlib.import_module(module)
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise EngineError("unknown_step_type", f"no handler for {type(config).__name__}")
    return handler
