"""Each step in turn, each feeding the next. A step that is not the last leaves a checkpoint
(its output model, its named outputs, its metrics) so a re-delivered job resumes after it."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.storage import ObjectStore
from worker.engine import evaluate
from modelpress.spec.configs import parse_step
from worker.engine.errors import GuardNotMet
from worker.engine.registry import StepContext, StepResult, beside, handler_for
from worker.runner.artifacts import finite
from worker.runner.inputs import LOAD_SHARE, JobInputs

STEPS_SHARE = 0.75  # of the job's progress bar


@dataclass
class StepsRun:
    current: Path  # the final model
    last_input: Path  # what the last step started from: the float twin of a quantized result
    metrics: list[dict] = field(default_factory=list)
    last_result: StepResult | None = None
    failure: GuardNotMet | None = None


class StoredCheckpoint:
    """A training step's checkpoint in object storage: it outlives the worker that wrote it."""

    def __init__(self, store: ObjectStore, key: str, workdir: Path):
        self.store, self.key, self.local = store, key, workdir / "checkpoint.pt"

    def load(self) -> bytes | None:
        if not self.store.exists(self.key):
            return None
        return self.store.get_file(self.key, self.local).read_bytes()

    def save(self, data: bytes) -> None:
        self.local.write_bytes(data)
        self.store.put_file(self.key, self.local)


def checkpoint_prefix(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/checkpoints/step-{index}"


def run_steps(job, inputs: JobInputs, store: ObjectStore, progress, work: Path) -> StepsRun:
    steps = job.spec["steps"]
    run = StepsRun(current=inputs.original, last_input=inputs.original)
    reference_outputs = None
    if len(steps) > 1 and inputs.eval_data is not None:
        reference_outputs = evaluate.run_outputs(evaluate.open_session(inputs.original, 1), inputs.eval_data.head(2000).images)
    for index, step in enumerate(steps):
        config = parse_step(step["type"], step["params"])
        step_dir = work / f"step-{index}"
        step_dir.mkdir()
        step_progress = progress.span(LOAD_SHARE + STEPS_SHARE * index / len(steps), STEPS_SHARE / len(steps), f"{index}:{step['type']}")
        step_progress("start", 0.0)
        saved = checkpoint_prefix(job.id, index)
        name = f"step {index + 1}/{len(steps)}: {step['type']} ({step['params'].get('method', step['type'])})"
        # A re-delivered job takes the finished steps' outputs from storage instead of running them again.
        if index < len(steps) - 1 and store.exists(f"{saved}/result.json"):
            progress.log(f"{name}: resumed from its checkpoint")
            run.current = _resume(store, saved, step_dir)
            run.metrics.append({**json.loads((step_dir / "result.json").read_text()), "resumed": True})
            continue
        run.last_input = run.current
        started = time.monotonic()
        progress.log(f"{name}: started")
        try:
            result = handler_for(config)(config, StepContext(
                model_path=run.current, original_path=inputs.original, workdir=step_dir, data=inputs.data,
                progress=step_progress, load_model=inputs.load_model,
                checkpoints=StoredCheckpoint(store, f"{saved}/training.pt", step_dir),
                task=job.spec.get("task"), floor=job.spec.get("floor", "default")))
        except GuardNotMet as exc:
            result, run.failure = exc.result, exc
        seconds = round(time.monotonic() - started, 3)  # the step alone, before its after-step measurement
        run.current, run.last_result = result.model_path, result
        after = {"size_bytes": run.current.stat().st_size}
        if len(steps) > 1 and inputs.eval_data is not None:  # a recipe's report shows where each step left the model
            after.update(evaluate.quality(run.current, inputs.eval_data, reference_outputs) or {})
        run.metrics.append({"type": step["type"], "size_bytes": after["size_bytes"], **result.metrics, "after_step": after,
                            "seconds": seconds})
        step_progress("done", 1.0)
        progress.log(f"{name}: done")
        if run.failure is not None:
            break  # later steps would build on a model that broke its promise
        if index < len(steps) - 1:
            _save(store, saved, step_dir, result, run.metrics[-1])
    return run


def _save(store: ObjectStore, saved: str, step_dir: Path, result: StepResult, metrics: dict) -> None:
    (step_dir / "result.json").write_text(json.dumps(finite(metrics)))
    store.put_file(f"{saved}/output.onnx", result.model_path)
    # Named outputs a later step reads (a prune step's channel statistics), beside the model.
    (step_dir / "outputs.json").write_text(json.dumps(sorted(result.outputs)))
    for name, path in result.outputs.items():
        store.put_file(f"{saved}/{name}", path)
    store.put_file(f"{saved}/outputs.json", step_dir / "outputs.json")
    store.put_file(f"{saved}/result.json", step_dir / "result.json")  # written last: marks the step done


def _resume(store: ObjectStore, saved: str, step_dir: Path) -> Path:
    current = store.get_file(f"{saved}/output.onnx", step_dir / "output.onnx")
    names = json.loads(store.get_file(f"{saved}/outputs.json", step_dir / "outputs.json").read_text()) \
        if store.exists(f"{saved}/outputs.json") else []
    for name in names:
        store.get_file(f"{saved}/{name}", beside(current, name))
    store.get_file(f"{saved}/result.json", step_dir / "result.json")
    return current
