"""Quantization-aware training goes through the one training loop (training.fit): a run resumed
from its checkpoint gives the same artifact as an uninterrupted one, the learned activation ranges
included, and its training fields are the shared TrainingSpec."""

import numpy as np
import pytest
import torch

from bench.reference import MobileNetSmall, export_all
from modelpress.spec.configs import QatConfig, TrainingSpec, parse_step
from modelpress.spec.errors import EngineError
from worker.engine.data import ImageSet
from worker.engine.registry import StepContext, handler_for


class MemoryCheckpoints:
    """training.Checkpoints in memory: every saved checkpoint is kept, the last one is loaded."""

    def __init__(self, saved: bytes | None = None):
        self.saves: list[bytes] = [] if saved is None else [saved]

    def load(self) -> bytes | None:
        return self.saves[-1] if self.saves else None

    def save(self, data: bytes) -> None:
        self.saves.append(data)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    rng = np.random.default_rng(0)
    images = rng.random((96, 1, 8, 8)).astype(np.float32)
    torch.manual_seed(0)
    path = export_all(MobileNetSmall(widths=(8, 16, 16)).eval(), images, root, "m")["onnx"]
    return path, ImageSet(images, rng.integers(0, 10, len(images)))


def run_qat(path, train, workdir, params, checkpoints):
    workdir.mkdir()
    config = parse_step("quantize", {"method": "qat", **params})
    ctx = StepContext(path, path, workdir, {"train": train}, lambda stage, fraction: None, checkpoints=checkpoints)
    result = handler_for(config)(config, ctx)
    return result.model_path.read_bytes(), result.metrics


@pytest.mark.parametrize("distill", [False, True])
def test_qat_resumed_from_its_checkpoint_gives_the_uninterrupted_result(model_and_data, tmp_path, distill):
    path, train = model_and_data
    params = {"epochs": 3, "lr": 1e-3, "batch_size": 32, "seed": 5, "distill": distill}
    whole = MemoryCheckpoints()
    uninterrupted, metrics = run_qat(path, train, tmp_path / "whole", params, whole)
    assert len(whole.saves) == 3 and metrics["resumed_from_epoch"] is None
    # A re-delivered job: the worker died after the second epoch's checkpoint.
    resumed, resumed_metrics = run_qat(path, train, tmp_path / "resumed", params, MemoryCheckpoints(whole.saves[1]))
    assert resumed_metrics["resumed_from_epoch"] == 2
    assert resumed_metrics["loss_per_epoch"] == metrics["loss_per_epoch"]
    assert resumed == uninterrupted  # weights and learned activation ranges (the Q/DQ scales) alike


def test_qat_without_its_checkpointed_ranges_would_differ(model_and_data, tmp_path):
    """The activation ranges live outside the module's parameters: a resume that restored only
    the weights would export other scales. Dropping them from the checkpoint changes the result."""
    import io

    path, train = model_and_data
    params = {"epochs": 2, "lr": 1e-3, "batch_size": 32}
    whole = MemoryCheckpoints()
    uninterrupted, _ = run_qat(path, train, tmp_path / "whole", params, whole)
    state = torch.load(io.BytesIO(whole.saves[0]), weights_only=True)
    assert state["extra"]["ranges"]  # every compute node's (min, max)
    state["extra"]["ranges"] = {name: (lo * 2, hi * 2) for name, (lo, hi) in state["extra"]["ranges"].items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    altered, _ = run_qat(path, train, tmp_path / "altered", params, MemoryCheckpoints(buffer.getvalue()))
    assert altered != uninterrupted


def test_training_steps_share_one_spec():
    """distill, prune finetune and qat take the same training fields, with their own defaults."""
    from modelpress.spec.configs import DistillConfig, FinetuneSpec

    for config, epochs, lr, schedule in ((DistillConfig(), 5, 3e-3, "cosine"), (FinetuneSpec(), 2, 3e-3, "cosine"),
                                         (QatConfig(), 1, 1e-4, "constant")):
        assert isinstance(config, TrainingSpec)
        assert (config.epochs, config.lr, config.schedule) == (epochs, lr, schedule)
        assert set(config.training_fields()) == set(TrainingSpec.model_fields)
    # The bounds travel with the shared fields: every step refuses the same bad values.
    for step_type, params in (("distill", {}), ("quantize", {"method": "qat"}), ("prune", {"finetune": {}})):
        for bad in ({"epochs": 0}, {"lr": 0}, {"batch_size": 5000}, {"optimizer": "adam"}):
            body = {**params, "finetune": bad} if step_type == "prune" else {**params, **bad}
            with pytest.raises(EngineError) as raised:
                parse_step(step_type, body)
            assert raised.value.code == "invalid_step_params"
