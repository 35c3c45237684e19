"""Recovery training after pruning (`finetune`), through the one training loop (training.fit):
the pruned weights of magnitude and n_m stay zero while the rest learn; every channel's BatchNorm
starts from its statistics in the unpruned model (train_norm)."""

from pathlib import Path

import torch

from modelpress.spec.configs import PruneStepConfig
from worker.engine.device import pick_device
from worker.engine.registry import StepContext
from worker.engine.training import TrainSpec, fit, trainable, write_back


def finetune(config: PruneStepConfig, source: Path, output: Path, masks: dict | None, targets: dict, ctx: StepContext,
              start: float, width: float) -> dict:
    train = ctx.data["train"]
    tune = config.finetune
    module, norms, source = trainable(source, train, pick_device(), ctx.workdir, targets)
    mask_by_key = {}
    if masks:  # unstructured/N:M: pruned weights stay zero while the rest learn
        mask_by_key = {module.keys[name]: torch.from_numpy(mask) for name, mask in masks.items() if name in module.keys}

    def keep_zeros(student):
        with torch.no_grad():
            for key, mask in mask_by_key.items():
                student.weights[key].mul_(mask.to(student.weights[key].device))

    distill = tune.distill
    spec = TrainSpec.of(tune, seed=config.seed, alpha=(0.5 if train.labels is not None else 0.0) if distill else 1.0)
    history = fit(module, train, spec, progress=lambda stage, f: ctx.progress(f"finetune {stage}", start + width * (0.1 + 0.9 * f)),
                  device=pick_device(), teacher_path=ctx.model_path if distill else None,
                  after_step=keep_zeros if mask_by_key else None,
                  # One checkpoint per step: iterative schedules (other shapes each round) start each round afresh.
                  checkpoints=ctx.checkpoints if config.iterations == 1 else None)
    write_back(module, norms, source, output)
    return {"epochs": tune.epochs, "lr": tune.lr, "distill": distill, **history}
