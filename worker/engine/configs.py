"""Typed, versioned configs of every step type. A step's `params` in a job become one of these.

The API validates with them before a job is accepted, the runner hands them to the step's handler,
and `model_dump()` gives the step with every default filled in (what a recipe records).
"""

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.engine.errors import EngineError


class StepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: Literal[1] = 1
    # Steps that train run on the GPU queue when one is configured.
    uses_gpu: ClassVar[bool] = False

    def wants_gpu(self) -> bool:
        return self.uses_gpu

    def required_data(self) -> set[str]:
        """Dataset roles (calibration, train, eval) the step cannot run without."""
        return set()

    def required_labels(self) -> set[str]:
        """Dataset roles whose data must carry labels."""
        return set()

    def referenced_models(self) -> dict[str, str]:
        """Other uploaded models the step uses, by role (teacher, student)."""
        return {}


class GuardSpec(BaseModel):
    """An accuracy promise the step must keep on held-out evaluation data, or fail with
    `guard_not_met`. Exactly one of the three criteria."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0)  # top-1, as a fraction (0.01 = 1 point)
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0)  # top-1 floor
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0)  # label-free: same class as the original
    # Part of the eval data kept out of the search and used only for the final check.
    holdout_fraction: float = Field(0.5, ge=0.2, le=0.8)

    @model_validator(mode="after")
    def _one_criterion(self) -> "GuardSpec":
        given = [k for k in ("max_accuracy_drop", "min_accuracy", "min_top1_agreement") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of max_accuracy_drop, min_accuracy, min_top1_agreement")
        return self

    @property
    def needs_labels(self) -> bool:
        return self.min_top1_agreement is None


class QuantizeConfig(StepConfig):
    """`method` picks the scheme; every other field has a default that fits it.

    static_int8: QDQ int8 weights and activations, calibrated (needs calibration data).
    dynamic_int8: int8 weights, activations quantized at run time (no calibration).
    weight_only: int8 or int4 weights (`bits`), per channel or in blocks (`block_size`); float compute.
    fp16: half-precision weights and compute; inputs/outputs stay fp32 unless `keep_io_types` is false.
    codebook: k-means non-uniform weights with 2**bits levels per layer (`bits` 2..8).
    """

    method: Literal["static_int8", "dynamic_int8", "weight_only", "fp16", "codebook", "qat"] = "static_int8"
    bits: int | None = Field(None, ge=2, le=8)  # default: 8 (int8 methods, weight_only), 4 (codebook)
    per_channel: bool = True
    symmetric: bool = True  # weights; static_int8 activations follow activation_type
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: float = Field(99.999, gt=90.0, le=100.0)
    # "auto" tries unsigned and signed activations and keeps the fastest that is as accurate:
    # measured on this class of CPU, signed activations left most convolutions in fp32 between Q/DQ
    # pairs (slower than fp32); unsigned ones ran every convolution in int8.
    activation_type: Literal["auto", "uint8", "int8"] = "auto"
    weight_type: Literal["int8", "uint8"] = "int8"
    calibration_samples: int = Field(256, ge=1, le=10_000)
    block_size: int | None = Field(None, ge=8, le=4096)  # weight_only: blocks along the input dimension
    keep_io_types: bool = True  # fp16
    exclude: list[str] = Field(default_factory=list, max_length=1000)  # node names or op types left float
    # Leave the first and the last compute layer float. Default: yes for 4 bits and fewer
    # (weight_only, codebook), where they hurt most for the least size; no otherwise.
    keep_first_last: bool | None = None
    guard: GuardSpec | None = None
    # qat: fine-tuning with fake quantization on data.train, then the same QDQ int8 export.
    epochs: int = Field(1, ge=1, le=100)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1, le=4096)
    distill: bool = False  # qat: learn from the original model's outputs (also without labels)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy and torch seeds are 32-bit

    def wants_gpu(self) -> bool:
        return self.method == "qat"

    @model_validator(mode="after")
    def _method_fits(self) -> "QuantizeConfig":
        allowed = {"static_int8": {8}, "dynamic_int8": {8}, "weight_only": {4, 8}, "fp16": {16},
                   "codebook": set(range(2, 9)), "qat": {8}}[self.method]
        default = {"codebook": 4, "fp16": 16}.get(self.method, 8)
        if self.method == "fp16" and self.bits not in (None, 16):
            raise ValueError("fp16 takes no bits")
        if self.bits is not None and self.method != "fp16" and self.bits not in allowed:
            raise ValueError(f"bits={self.bits} does not fit method {self.method} (allowed: {sorted(allowed)})")
        if self.block_size is not None and self.method != "weight_only":
            raise ValueError("block_size applies to method weight_only")
        if self.bits is None and self.method != "fp16":
            self.bits = default
        if self.keep_first_last is None:
            self.keep_first_last = self.method in ("weight_only", "codebook") and (self.bits or 8) <= 4
        return self

    def required_data(self) -> set[str]:
        roles = {"static_int8": {"calibration"}, "qat": {"train"}}.get(self.method, set())
        return roles | ({"eval"} if self.guard else set())

    def required_labels(self) -> set[str]:
        return {"eval"} if self.guard and self.guard.needs_labels else set()


class FinetuneSpec(BaseModel):
    """Recovery training after pruning, on data.train: `distill` learns from the unpruned model's
    outputs as well as the labels (only from them when the data has no labels)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(2, ge=1, le=100)
    # Measured on Fashion-MNIST at 50% fewer MACs, one epoch: 3e-3 recovered MobileNet to 0.849 and
    # ResNet to 0.881 top-1; 1e-3 left MobileNet at 0.763.
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    distill: bool = False
    batch_size: int = Field(64, ge=1, le=4096)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    max_steps: int | None = Field(None, ge=1, le=10_000_000)


class PruneConfig(StepConfig):
    """`method` picks the kind of pruning.

    magnitude: zero the smallest weights (|w|) of every Conv/Gemm/MatMul, per layer or globally,
      to `sparsity`; the artifact also comes zstd-compressed (model.onnx.zst), where zeros pay off.
    n_m: keep the `n` largest of every `m` consecutive weights along the input dimension (2:4).
    channels: remove whole channels (default 30% of each prunable group, rounded to multiples of
      `round_to` so the kernels stay fast); or give `target_macs` / `target_params` as the fraction
      of the original to keep and the step finds the ratio.
    """

    method: Literal["magnitude", "n_m", "channels"] = "channels"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)  # magnitude
    scope: Literal["layer", "global"] = "layer"  # magnitude
    min_weights: int = Field(1024, ge=0, le=1 << 30)  # magnitude, n_m: smaller layers are left (and listed)
    n: int = Field(2, ge=1, le=64)  # n_m
    m: int = Field(4, ge=2, le=64)  # n_m
    ratio: float | None = Field(None, ge=0.0, lt=1.0)  # channels: fraction of each group's channels removed
    target_macs: float | None = Field(None, gt=0.0, le=1.0)  # channels: fraction of the original MACs to keep
    target_params: float | None = Field(None, gt=0.0, le=1.0)  # channels: fraction of the original parameters
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    round_to: int = Field(8, ge=1, le=256)
    exclude: list[str] = Field(default_factory=list, max_length=1000)  # node names or op types left as they are
    finetune: FinetuneSpec | None = None
    # Iterative schedule: prune a share, fine-tune, repeat (magnitude: cubic sparsity ramp).
    iterations: int = Field(1, ge=1, le=20)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy and torch seeds are 32-bit

    def wants_gpu(self) -> bool:
        return self.finetune is not None

    @model_validator(mode="after")
    def _method_fits(self) -> "PruneConfig":
        targets = [k for k in ("ratio", "target_macs", "target_params") if getattr(self, k) is not None]
        if self.method == "n_m" and self.n >= self.m:
            raise ValueError(f"n must be smaller than m (got n={self.n}, m={self.m})")
        if targets and self.method != "channels":
            raise ValueError(f"{targets[0]} applies to method channels; method {self.method} takes "
                             f"{'sparsity' if self.method == 'magnitude' else 'n and m'}")
        if len(targets) > 1:
            raise ValueError(f"give one of ratio, target_macs, target_params (got {', '.join(targets)})")
        if self.method == "channels" and not targets:
            self.ratio = 0.3
        if self.method == "n_m" and self.iterations > 1:
            raise ValueError("n_m prunes in one step; iterations applies to magnitude and channels")
        return self

    def required_data(self) -> set[str]:
        if self.finetune:
            return {"train"}  # taylor importance also takes its gradients from the train data
        return {"calibration"} if self.importance == "taylor" and self.method == "channels" else set()

    def required_labels(self) -> set[str]:
        return {"train"} if self.finetune and not self.finetune.distill else set()


class FromTeacher(BaseModel):
    """A student made from the teacher: a structurally pruned copy (channels, l2, `round_to`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prune_channels: float = Field(gt=0.0, lt=1.0)
    round_to: int = Field(8, ge=1, le=256)


class DistillConfig(StepConfig):
    """Knowledge distillation: the student learns from the teacher's outputs (and the labels).

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
    plus `feature_weight` * MSE on `feature_pairs` ([teacher tensor, student tensor], through a
    learned 1x1 adapter). Teacher: `teacher_model_id`, default the job's original model. Student:
    `student_model_id`, or `from_teacher`, default the previous step's output (the job's model for
    a first step).
    """

    uses_gpu: ClassVar[bool] = True

    teacher_model_id: str | None = Field(None, max_length=64)
    student_model_id: str | None = Field(None, max_length=64)
    from_teacher: FromTeacher | None = None
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    epochs: int = Field(5, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    # As FinetuneSpec.lr: a pruned student at 50% fewer channels (digits, 4 epochs) reached 0.36
    # top-1 at 1e-3, 0.79 at 3e-3.
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1, le=4096)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0, le=100.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    augment: list[Literal["flip", "crop", "noise"]] = Field(default_factory=list, max_length=3)
    patience: int | None = Field(None, ge=1, le=1000)  # early stopping on the eval split, in epochs
    feature_pairs: list[tuple[str, str]] = Field(default_factory=list, max_length=16)
    feature_weight: float = Field(1.0, ge=0.0, le=1000.0)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy and torch seeds are 32-bit

    @model_validator(mode="after")
    def _one_student(self) -> "DistillConfig":
        if self.student_model_id is not None and self.from_teacher is not None:
            raise ValueError("give student_model_id or from_teacher, not both")
        return self

    def required_data(self) -> set[str]:
        return {"train"}

    def required_labels(self) -> set[str]:
        return {"train"} if self.alpha > 0 else set()

    def referenced_models(self) -> dict[str, str]:
        return {role: model_id for role, model_id in (("teacher", self.teacher_model_id), ("student", self.student_model_id)) if model_id}


STEP_CONFIGS: dict[str, type[StepConfig]] = {"quantize": QuantizeConfig, "prune": PruneConfig, "distill": DistillConfig}


class PreprocessSpec(BaseModel):
    """How a dataset's images become model input, stored with the dataset and applied the same way
    wherever it is used. Every field is optional; without one the defaults apply: uint8 pixels are
    divided by 255 (float arrays used as they are), decoded images take the model's channel count
    (1: grayscale, 3: RGB) and its spatial size when it is fixed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: Literal[1] = 1
    # An int resizes the shorter side (keeping the aspect ratio); [h, w] resizes exactly. Image files only.
    resize: int | tuple[int, int] | None = None
    center_crop: tuple[int, int] | None = None  # [h, w], after resize. Image files only.
    channels: Literal["rgb", "bgr", "gray"] | None = None
    # Bounded so that preprocessed pixels stay far inside float32 (an extreme scale made inf inputs).
    scale: float | None = Field(None, ge=1e-6, le=1e6)  # multiplies pixel values; default 1/255 for uint8, 1 for float
    mean: list[Annotated[float, Field(ge=-1e6, le=1e6)]] | None = Field(None, min_length=1, max_length=4)  # subtracted after scaling
    std: list[Annotated[float, Field(ge=1e-6, le=1e6)]] | None = Field(None, min_length=1, max_length=4)  # divides after the mean
    layout: Literal["NCHW", "NHWC", "NHW"] | None = None  # of an .npz's images, when the guess is wrong

    @model_validator(mode="after")
    def _check(self) -> "PreprocessSpec":
        sizes = [self.resize] if isinstance(self.resize, int) else list(self.resize or ())
        sizes += list(self.center_crop or ())
        if any(not 1 <= size <= 4096 for size in sizes):
            raise ValueError("resize and center_crop sizes must be between 1 and 4096")
        if self.std is not None and any(value <= 0 for value in self.std):
            raise ValueError("std values must be positive")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std need the same number of values")
        return self


def parse_preprocess(raw: dict | None) -> PreprocessSpec:
    try:
        return PreprocessSpec.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'preprocess'}: {e['msg']}" for e in exc.errors())
        raise EngineError("invalid_preprocess", f"preprocess: {problems}") from exc


def register_config(step_type: str):
    """Register the config of a new step type (its handler registers with registry.register)."""

    def decorate(config_class: type[StepConfig]) -> type[StepConfig]:
        STEP_CONFIGS[step_type] = config_class
        return config_class

    return decorate


def parse_step(step_type: str, params: dict) -> StepConfig:
    config_class = STEP_CONFIGS.get(step_type)
    if config_class is None:
        raise EngineError("unknown_step_type", f"unknown step type {step_type!r}; known: {sorted(STEP_CONFIGS)}")
    try:
        return config_class.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
        raise EngineError("invalid_step_params", f"{step_type} params: {problems}") from exc
