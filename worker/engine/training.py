"""One training loop for every step that trains: pruning recovery, distillation and quantization-
aware training.

The student is an OnnxModule (onnx_torch), whatever was uploaded. The loss is

    alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(KL with reduction `batchmean`; T^2 keeps the soft term's gradients the same size whatever T),
plus, optionally, a hint loss: MSE between a teacher layer and a student layer through a learned
1x1 adapter. Without a teacher it is plain cross-entropy. The teacher only runs forward: its
logits are computed once per sample with ONNX Runtime and reused every epoch, unless augmentation
or hint layers need it on every batch (then it runs as a torch module under no_grad).

After every epoch the loop saves a checkpoint through `Checkpoints` (object storage in the
service), and starts from the last one if it finds one: a job re-delivered after its worker died
resumes instead of starting over. A caller whose module carries learned state outside its
parameters (qat's activation ranges) hands it in as `extra_state`: it is checkpointed and restored
with the weights. Each training step reports progress, which is where a cancel request or the
deadline stops it.
"""

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from modelpress.spec.configs import TrainingSpec
from modelpress.spec.errors import EngineError
from worker.engine.data import ImageSet
from worker.engine.evaluate import open_session, run_outputs
from worker.engine.formats import untie_weights
from worker.engine.onnx_torch import OnnxModule, onnx_to_torch, save_weights
from worker.engine import stoppable, train_norm

MAX_EVAL_SAMPLES = 2000


@dataclass
class TrainSpec:
    epochs: int = 3
    max_steps: int | None = None  # a step budget across all epochs; None: epochs alone decide
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: Literal["sgd", "adamw"] = "adamw"
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    augment: list[str] = field(default_factory=list)  # "flip", "crop", "noise"
    patience: int | None = None  # early stopping on the eval split, in epochs
    seed: int = 0
    temperature: float = 4.0
    alpha: float = 1.0  # weight of the hard-label loss; 0: label-free distillation
    feature_pairs: list[tuple[str, str]] = field(default_factory=list)  # (teacher tensor, student tensor)
    feature_weight: float = 1.0
    # How each epoch's shuffle is seeded: "per_epoch" from seed and epoch; "one_stream" draws every
    # epoch's order from one generator seeded once (qat's order before it moved here, kept so its
    # artifacts stay the same; a resume replays the earlier epochs' draws).
    shuffle: Literal["per_epoch", "one_stream"] = "per_epoch"

    @classmethod
    def of(cls, training: TrainingSpec, **step_fields) -> "TrainSpec":
        """The spec of a step's training fields (modelpress.spec.configs.TrainingSpec), plus what
        only that step sets (seed, loss mix, distillation's extras)."""
        return cls(**training.training_fields(), **step_fields)


class Checkpoints(Protocol):
    def load(self) -> bytes | None: ...
    def save(self, data: bytes) -> None: ...


class ExtraState(Protocol):
    """Learned state outside the module's parameters, kept in the checkpoint (plain data)."""

    def state(self) -> dict: ...
    def restore(self, state: dict) -> None: ...


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                      alpha: float, temperature: float) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student), KL averaged over the batch."""
    loss = student.new_zeros(())
    if alpha > 0:
        if labels is None:
            raise EngineError("train_labels_required", "alpha > 0 needs labelled training data; use alpha 0 for label-free distillation")
        loss = loss + alpha * F.cross_entropy(student, labels)
    if alpha < 1:
        if teacher is None:
            raise EngineError("teacher_required", "alpha < 1 needs a teacher")
        soft_teacher = F.softmax(teacher / temperature, dim=1)
        soft_student = F.log_softmax(student / temperature, dim=1)
        loss = loss + (1 - alpha) * temperature**2 * F.kl_div(soft_student, soft_teacher, reduction="batchmean")
    return loss


def augment(images: torch.Tensor, kinds: list[str], generator: torch.Generator) -> torch.Tensor:
    if "flip" in kinds:
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    if "crop" in kinds:  # pad 1/8 of the side by reflection, crop back at a random offset
        pad = max(1, images.shape[-1] // 8)
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
        dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
        images = padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]
    if "noise" in kinds:
        scale = images.std().clamp_min(1e-6) * 0.05
        images = images + torch.randn(images.shape, generator=generator).to(images.device) * scale
    return images


def _scheduler(optimizer, spec: TrainSpec, steps_per_epoch: int, total_steps: int):
    warmup = int(spec.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if spec.schedule == "step":  # x0.1 at 1/2 and 3/4 of training
            return 0.1 ** sum(step >= total_steps * f for f in (0.5, 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Teacher:
    """The teacher's outputs: cached once per sample, or computed per batch when inputs change
    (augmentation) or hint layers are needed."""

    def __init__(self, path: Path, images: np.ndarray, spec: TrainSpec, device: str):
        self.per_batch = bool(spec.augment or spec.feature_pairs)
        if self.per_batch:
            self.module = onnx_to_torch(path).to(device).eval()
            self.module.capture = {t for t, _ in spec.feature_pairs}
            for parameter in self.module.parameters():
                parameter.requires_grad_(False)
        else:
            self.cache = torch.from_numpy(run_outputs(open_session(path, threads=1), images)[0])

    def __call__(self, index: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if not self.per_batch:
            return self.cache[index].to(batch.device), {}
        with torch.no_grad():
            logits = self.module(batch)
            logits = logits[0] if isinstance(logits, tuple) else logits
            return logits, dict(self.module.captured)


def _score(module: nn.Module, data: ImageSet | None, reference: np.ndarray | None, device: str) -> float | None:
    """Top-1 accuracy on labelled eval data; agreement with the teacher's top-1 without labels."""
    if data is None or (data.labels is None and reference is None):
        return None
    module.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(data), 256):
            stoppable.check()  # a torch forward cannot be stopped: check between batches
            out = module(torch.from_numpy(data.images[start : start + 256]).to(device))
            predictions.append((out[0] if isinstance(out, tuple) else out).argmax(1).cpu().numpy())
    module.train()
    predicted = np.concatenate(predictions)
    target = data.labels if data.labels is not None else reference.argmax(1)
    return float(np.mean(predicted == target))


def trainable(path: Path, train: ImageSet, device: str, workdir: Path,
              targets: dict | None = None) -> tuple[OnnxModule, "train_norm.ConvNorms | None", Path]:
    """The ONNX model as a module to train, with BatchNorm back after its convolutions
    (train_norm; `targets`: the statistics to start each from, see train_norm.attach), and the
    graph to write its weights back into (every weight its own)."""
    model = onnx.load(str(path))
    untie_weights(model)
    source = workdir / f"{path.stem}-trainable.onnx"
    onnx.save(model, str(source))
    module = onnx_to_torch(source).to(device)
    return module, train_norm.attach(module, train.images, device, targets=targets), source


def write_back(module: OnnxModule, norms, source: Path, output: Path) -> None:
    """The trained weights into the ONNX graph they came from, BatchNorm folded out again."""
    module.eval().cpu()
    if norms is not None:
        train_norm.fold(module, norms.cpu(), source, output)
    else:
        save_weights(module, source, output)


def _serialize(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _check_labels(student: OnnxModule, images: torch.Tensor, labels: torch.Tensor, device: str) -> None:
    student.eval()  # a probe: BatchNorm statistics (torch students) must not learn from it
    with torch.no_grad():
        out = student(images[:2].to(device))
    student.train()
    classes = (out[0] if isinstance(out, tuple) else out).shape[-1]
    if int(labels.max()) >= classes:
        raise EngineError("invalid_labels", f"the training labels go up to {int(labels.max())}; the model has {classes} outputs")


def _feature_adapters(student: OnnxModule, teacher, images: torch.Tensor, spec: TrainSpec, device: str) -> nn.ModuleDict:
    """One 1x1 convolution per feature pair, from the student's channels to the teacher's."""
    adapters = nn.ModuleDict()
    if not spec.feature_pairs:
        return adapters
    probe = images[:2].to(device)
    student(probe)
    _, teacher_features = teacher(torch.arange(2), probe)
    for t_name, s_name in spec.feature_pairs:
        s_feat, t_feat = student.captured.get(s_name), teacher_features.get(t_name)
        if s_feat is None or t_feat is None or s_feat.dim() != 4 or t_feat.dim() != 4 or s_feat.shape[2:] != t_feat.shape[2:]:
            raise EngineError("invalid_feature_pairs", f"feature pair ({t_name!r}, {s_name!r}): both must be 4-D tensors of the "
                              "same spatial size in the teacher and the student")
        adapters[str(len(adapters))] = nn.Conv2d(s_feat.shape[1], t_feat.shape[1], 1).to(device)
    return adapters


def _optimizer(parameters: list, spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay, nesterov=True)
    return torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=spec.weight_decay)


class _Run:
    """What one fit changes as it goes, and what a checkpoint holds to resume it."""

    def __init__(self, student, adapters, optimizer, scheduler, extra: ExtraState | None = None):
        self.student, self.adapters, self.optimizer, self.scheduler = student, adapters, optimizer, scheduler
        self.extra = extra
        self.history: list[dict] = []
        self.start_epoch, self.step, self.resumed_from = 0, 0, None
        self.best_score, self.best_state, self.stale = -1.0, None, 0

    def restore(self, saved: bytes, device: str) -> None:
        state = torch.load(io.BytesIO(saved), weights_only=True, map_location=device)
        self.student.load_state_dict(state["student"])
        self.adapters.load_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history, self.step, self.start_epoch = state["history"], state["step"], state["epoch"] + 1
        self.best_score, self.best_state, self.stale = state["best_score"], state["best_state"], state["stale"]
        if self.extra is not None:
            self.extra.restore(state["extra"])
        self.resumed_from = self.start_epoch

    def state(self, epoch: int) -> bytes:
        return _serialize({
            "student": self.student.state_dict(), "adapters": self.adapters.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "history": self.history, "step": self.step, "epoch": epoch,
            "best_score": self.best_score, "best_state": self.best_state, "stale": self.stale,
            **({"extra": self.extra.state()} if self.extra is not None else {})})

    def end_epoch(self, epoch: int, score: float | None, loss: float) -> None:
        self.history.append({"epoch": epoch + 1, "loss": loss, "eval_score": score,
                             "lr": round(self.scheduler.get_last_lr()[0], 8)})
        if score is not None and score > self.best_score:
            self.best_score, self.stale = score, 0
            self.best_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        else:
            self.stale += 1


def _epoch_order(spec: TrainSpec, epoch: int, samples: int) -> tuple[torch.Generator, torch.Tensor]:
    """This epoch's generator and sample order: the same after a resume as in an uninterrupted run."""
    if spec.shuffle == "one_stream":
        generator = torch.Generator().manual_seed(spec.seed)
        for _ in range(epoch):
            torch.randperm(samples, generator=generator)
    else:
        generator = torch.Generator().manual_seed(spec.seed * 1000 + epoch)
    return generator, torch.randperm(samples, generator=generator)


def _train_epoch(run: _Run, epoch: int, images, labels, teacher, spec: TrainSpec, total_steps: int, *,
                 device: str, progress, after_step) -> float:
    """One pass over the training images in this epoch's order; the mean batch loss."""
    student = run.student
    generator, order = _epoch_order(spec, epoch, len(images))
    total, batches = 0.0, 0
    for start in range(0, len(images), spec.batch_size):
        if run.step >= total_steps:
            break
        index = order[start : start + spec.batch_size]
        batch = images[index].to(device)
        if spec.augment:
            batch = augment(batch, spec.augment, generator)
        out = student(batch)
        logits = out[0] if isinstance(out, tuple) else out
        teacher_logits, teacher_features = teacher(index, batch) if teacher is not None else (None, {})
        loss = distillation_loss(logits, teacher_logits, None if labels is None else labels[index].to(device),
                                 spec.alpha if teacher is not None else 1.0, spec.temperature)
        for number, (t_name, s_name) in enumerate(spec.feature_pairs):
            hint = run.adapters[str(number)](student.captured[s_name])
            loss = loss + spec.feature_weight * F.mse_loss(hint, teacher_features[t_name])
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        if after_step is not None:
            after_step(student)
        run.step += 1
        total += loss.item()
        batches += 1
        progress(f"epoch {epoch + 1}/{spec.epochs}", run.step / total_steps)
    return round(total / max(batches, 1), 5)


def fit(student: OnnxModule, train: ImageSet, spec: TrainSpec, *, progress: Callable[[str, float], None], device: str,
        teacher_path: Path | None = None, eval_data: ImageSet | None = None,
        after_step: Callable[[OnnxModule], None] | None = None, checkpoints: Checkpoints | None = None,
        extra_state: ExtraState | None = None) -> dict:
    """Train `student` in place. Returns the history (loss and eval score per epoch) and what was
    done: epochs run, steps, whether it resumed or stopped early."""
    torch.manual_seed(spec.seed)
    student.to(device).train()
    images = torch.from_numpy(train.images)
    labels = None if train.labels is None else torch.from_numpy(train.labels)
    if labels is not None and spec.alpha > 0:
        _check_labels(student, images, labels, device)
    teacher = Teacher(teacher_path, train.images, spec, device) if teacher_path is not None and spec.alpha < 1 else None
    eval_data = eval_data.head(MAX_EVAL_SAMPLES) if eval_data is not None else None
    eval_reference = None
    if eval_data is not None and eval_data.labels is None and teacher_path is not None:
        eval_reference = run_outputs(open_session(teacher_path, threads=1), eval_data.images)[0]

    student.capture = {s for _, s in spec.feature_pairs}
    adapters = _feature_adapters(student, teacher, images, spec, device)
    optimizer = _optimizer([*student.parameters(), *adapters.parameters()], spec)
    steps_per_epoch = max(1, math.ceil(len(images) / spec.batch_size))
    total_steps = spec.epochs * steps_per_epoch if spec.max_steps is None else min(spec.max_steps, spec.epochs * steps_per_epoch)
    run = _Run(student, adapters, optimizer, _scheduler(optimizer, spec, steps_per_epoch, total_steps), extra_state)
    saved = checkpoints.load() if checkpoints is not None else None
    if saved is not None:
        run.restore(saved, device)

    stopped_early = False
    for epoch in range(run.start_epoch, spec.epochs):
        if run.step >= total_steps:
            break
        loss = _train_epoch(run, epoch, images, labels, teacher, spec, total_steps,
                            device=device, progress=progress, after_step=after_step)
        score = _score(student, eval_data, eval_reference, device)
        run.end_epoch(epoch, score, loss)
        stopped_early = spec.patience is not None and run.stale > spec.patience
        if checkpoints is not None:
            checkpoints.save(run.state(epoch))
        shown = f", eval {score:.4f}" if score is not None else ""
        progress(f"epoch {epoch + 1}/{spec.epochs} done: loss {loss:.4f}{shown}", run.step / total_steps)
        if stopped_early:
            break
    if spec.patience is not None and run.best_state is not None:
        student.load_state_dict(run.best_state)  # early stopping keeps the best epoch on the eval split
    student.eval()
    student.capture = set()
    return {"history": run.history, "steps": run.step, "epochs_run": len(run.history), "resumed_from_epoch": run.resumed_from,
            "stopped_early": stopped_early, "best_eval_score": run.best_score if run.best_score >= 0 else None,
            "train_samples": len(images), "device": device, "seed": spec.seed}
