"""The training steps on a CUDA device: prune with fine-tuning (structured, and unstructured with
its mask kept on the GPU), distill with hint layers and augmentation, a resumed checkpoint, and
qat. Each must report device "cuda" and learn; the same steps also run on the CPU for a timing
comparison. Run on a machine with a GPU (CI has none):

    python -m bench.gpu_check
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.reference import ResNetSmall, export_all, load_digits_split, train
from worker.engine import device
from modelpress.spec.configs import ChannelPruneConfig, DistillConfig, MagnitudePruneConfig, QatConfig
from worker.engine.data import ImageSet
from worker.engine.distill import distill
from worker.engine.prune import prune
from worker.engine.quantize import quantize
from worker.engine.registry import StepContext


class MemoryCheckpoints:
    def __init__(self):
        self.data = None

    def load(self):
        return self.data

    def save(self, data):
        self.data = data


def main() -> None:
    import sys

    places = ("cpu",) if "--cpu-only" in sys.argv else ("cuda", "cpu")  # --cpu-only: check the script itself here
    assert places == ("cpu",) or torch.cuda.is_available(), "no CUDA device"
    gpu = places[0]
    real_is_available = torch.cuda.is_available
    train_split, test_split = load_digits_split()
    out = Path(tempfile.mkdtemp())
    teacher = export_all(train(ResNetSmall(widths=(16, 32, 64)), train_split, epochs=6), test_split.images, out, "teacher")["onnx"]
    data = {"train": ImageSet(train_split.images.astype(np.float32) / 255, train_split.labels),
            "eval": ImageSet(test_split.images.astype(np.float32) / 255, test_split.labels),
            "calibration": ImageSet(train_split.images[:256].astype(np.float32) / 255, None)}
    pair = ["/stages/stages.1/Relu_1_output_0"] * 2
    cases = {
        "prune channels + distilled finetune": (prune, ChannelPruneConfig(ratio=0.5, round_to=4,
                                                                   finetune={"epochs": 4, "distill": True})),
        "prune magnitude 70% + finetune": (prune, MagnitudePruneConfig(sparsity=0.7, finetune={"epochs": 3})),
        "distill from_teacher, hints, augment": (distill, DistillConfig(from_teacher={"prune_channels": 0.5, "round_to": 4}, epochs=6,
                                                                        feature_pairs=[pair], augment=["flip", "noise"])),
        "qat": (quantize, QatConfig(epochs=2, lr=1e-4)),
    }
    rows = []
    for name, (handler, config) in cases.items():
        for where in places:
            device.pick_device.cache_clear()
            if where == "cpu":
                torch.cuda.is_available = lambda: False  # the engine's own device choice, forced to the CPU
            work = Path(tempfile.mkdtemp())
            started = time.perf_counter()
            result = handler(config, StepContext(teacher, teacher, work, data, lambda *_: None, checkpoints=MemoryCheckpoints()))
            seconds = time.perf_counter() - started
            torch.cuda.is_available = real_is_available
            metrics = result.metrics
            training = metrics.get("training") or (metrics.get("iterations") or [{}])[0].get("finetune") or metrics
            assert training.get("device") == where, (name, training.get("device"))
            quality = metrics.get("quality", {})
            after = quality.get("after_recovery") or quality.get("student_after") or {}
            rows.append((name, where, seconds, after.get("top1"), after.get("top1_agreement")))

    # Resume: train 2 of 4 epochs on the GPU, "die", and finish from the checkpoint.
    device.pick_device.cache_clear()
    checkpoints = MemoryCheckpoints()
    config = DistillConfig(from_teacher={"prune_channels": 0.5, "round_to": 4}, epochs=4)
    calls = {"n": 0}

    def dies_after_two_epochs(stage, fraction):
        calls["n"] += 1
        if "epoch 3/" in stage:
            raise RuntimeError("worker died")

    try:
        distill(config, StepContext(teacher, teacher, Path(tempfile.mkdtemp()), data, dies_after_two_epochs, checkpoints=checkpoints))
    except RuntimeError:
        pass
    resumed = distill(config, StepContext(teacher, teacher, Path(tempfile.mkdtemp()), data, lambda *_: None, checkpoints=checkpoints))
    training = resumed.metrics["training"]
    assert training["resumed_from_epoch"] == 2 and training["device"] == gpu and len(training["history"]) == 4, training

    print(f"GPU: {torch.cuda.get_device_name(0) if gpu == 'cuda' else 'none'}; torch {torch.__version__}")
    print("| step | device | seconds | top-1 after | agreement |")
    print("|---|---|---|---|---|")
    for name, where, seconds, top1, agreement in rows:
        print(f"| {name} | {where} | {seconds:.1f} | {top1 if top1 is None else f'{top1:.4f}'} | "
              f"{agreement if agreement is None else f'{agreement:.4f}'} |")
    print(f"resume on {gpu}: resumed_from_epoch={training['resumed_from_epoch']}, epochs={len(training['history'])}, OK")


if __name__ == "__main__":
    main()
