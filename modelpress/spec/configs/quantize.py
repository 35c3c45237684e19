"""Configs of the `quantize` step, one per scheme (`method`).

static_int8: QDQ int8 weights and activations, calibrated (needs calibration data).
dynamic_int8: int8 weights, activations quantized at run time (no calibration).
fp16: half-precision weights and compute; inputs/outputs stay fp32 unless `keep_io_types` is false.
weight_only: int8 or int4 weights (`bits`), per channel or in blocks (`block_size`); float compute.
codebook: k-means non-uniform weights with 2**bits levels per layer (`bits` 2..8).
qat: fine-tuning with fake quantization on data.train, then the same QDQ int8 export as static_int8.
"""

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelpress.spec.configs.base import StepConfig, drop_ignored_v1_fields, register_step_type
from modelpress.spec.configs.training import Epochs, LearningRate, Seed, TrainingSpec


class GuardSpec(BaseModel):
    """An accuracy promise the step must keep on held-out evaluation data, or fail with
    `guard_not_met`. Exactly one of the three criteria."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0)  # top-1, as a fraction (0.01 = 1 point)
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0)  # top-1 floor
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0)  # label-free: same class as the original
    # Part of the eval data kept out of the search and used only for the final check.
    holdout_fraction: float = Field(0.5, ge=0.2, le=0.8)
    # Seconds the search may spend building candidates; when it is used up the best candidate so
    # far is checked (and the attempts not tried are listed). Ten minutes by default.
    budget_s: float = Field(600.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _one_criterion(self) -> "GuardSpec":
        given = [k for k in ("max_accuracy_drop", "min_accuracy", "min_top1_agreement") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of max_accuracy_drop, min_accuracy, min_top1_agreement")
        return self

    @property
    def needs_labels(self) -> bool:
        return self.min_top1_agreement is None


class QuantizeStepConfig(StepConfig):
    """What every scheme takes: layers left float and an optional accuracy guard."""

    exclude: list[str] = Field(default_factory=list, max_length=1000)  # node names or op types left float
    guard: GuardSpec | None = None
    # Dataset roles the scheme itself needs (the guard adds eval).
    needs_data: ClassVar[frozenset[str]] = frozenset()

    def required_data(self) -> set[str]:
        return set(self.needs_data) | ({"eval"} if self.guard else set())

    def required_labels(self) -> set[str]:
        return {"eval"} if self.guard and self.guard.needs_labels else set()


class Int8ExportFields(QuantizeStepConfig):
    """The QDQ int8 export shared by static_int8 and qat."""

    bits: Literal[8] = 8
    per_channel: bool = True
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: float = Field(99.999, gt=90.0, le=100.0)
    # "auto" tries unsigned and signed activations and keeps the fastest that is as accurate:
    # measured on this class of CPU, signed activations left most convolutions in fp32 between Q/DQ
    # pairs (slower than fp32); unsigned ones ran every convolution in int8.
    activation_type: Literal["auto", "uint8", "int8"] = "auto"
    weight_type: Literal["int8", "uint8"] = "int8"
    calibration_samples: int = Field(256, ge=1, le=10_000)


class StaticInt8Config(Int8ExportFields):
    method: Literal["static_int8"] = "static_int8"
    # Cross-layer equalization of conv -> [Relu] -> conv pairs before calibration (no data needed):
    # helps per-tensor weight scales on depthwise-separable networks; see worker/engine/quantize/equalize.py.
    equalize: bool = False
    # Fold the channel-mean shift that quantized weights cause back into each layer's bias, measured
    # on the calibration images; see worker/engine/quantize/bias_correction.py.
    bias_correction: Literal["off", "fast", "sequential"] = "off"
    # Learn each int8 weight's rounding (up or down) from the calibration images instead of rounding
    # to nearest; see worker/engine/quantize/adaround.py.
    adaround: bool = False
    # Node names or op types whose output activations are quantized to 16 bits (uint16 Q/DQ, which
    # ONNX Runtime runs on CPU): for tensors one 8-bit scale cannot cover, such as a detector's
    # concatenation of pixel boxes and 0..1 scores. Their consumers then compute in float.
    wide_activations: list[str] = Field(default_factory=list, max_length=1000)
    # Per-tensor precision applied to the built QDQ model, by tensor key (an activation's float
    # tensor name, or `weight:<node>`): "int16" (activations: 16-bit Q/DQ over the calibrated range)
    # or "float". Usually decided by the repair ladder's per-tensor rung and written into the recipe;
    # see worker/engine/quantize/tensor_precision.py.
    tensor_precision: dict[Annotated[str, Field(max_length=1000)], Literal["int16", "float"]] = Field(default_factory=dict, max_length=1000)
    # The repair ladder's per-tensor precision rung (worker/engine/quantize/precision_rung.py).
    precision_repair: bool = True
    # Without a guard: when the result misses the job's safety floor (its task fidelity against
    # the step's input model), the guard's repair ladder runs by itself, judged by the floor, for
    # at most `repair_budget_s`; the best candidate is kept either way (worker/engine/quantize/guard.py).
    repair: bool = True
    repair_budget_s: float = Field(600.0, gt=0, le=86_400)
    needs_data: ClassVar[frozenset[str]] = frozenset({"calibration"})


class QatConfig(Int8ExportFields, TrainingSpec):
    """Training fields: `TrainingSpec`, with one epoch at a constant 1e-4 (the weights only learn
    to live with the rounding)."""

    method: Literal["qat"] = "qat"
    uses_gpu: ClassVar[bool] = True
    needs_data: ClassVar[frozenset[str]] = frozenset({"train"})
    epochs: Epochs = 1
    lr: LearningRate = 1e-4
    schedule: Literal["cosine", "step", "constant"] = "constant"
    # Learn from the original model's outputs (also without labels): half KL, half cross-entropy
    # with labels, KL alone without.
    distill: bool = False
    seed: Seed = 0

    def export_config(self) -> StaticInt8Config:
        """The static int8 export after training: uint8 activations whose ranges training learned."""
        shared = {name: getattr(self, name) for name in Int8ExportFields.model_fields if name != "version"}
        return StaticInt8Config(**{**shared, "guard": None, "activation_type": "uint8", "calibration": "minmax"})


class DynamicInt8Config(QuantizeStepConfig):
    method: Literal["dynamic_int8"] = "dynamic_int8"
    bits: Literal[8] = 8
    per_channel: bool = True
    weight_type: Literal["int8", "uint8"] = "int8"


class Fp16Config(QuantizeStepConfig):
    method: Literal["fp16"] = "fp16"
    keep_io_types: bool = True


class LowBitWeightFields(QuantizeStepConfig):
    # Leave the first and the last compute layer float. Default: yes for 4 bits and fewer, where
    # they hurt most for the least size; no otherwise.
    keep_first_last: bool | None = None

    @model_validator(mode="after")
    def _default_keep_first_last(self) -> "LowBitWeightFields":
        if self.keep_first_last is None:
            self.keep_first_last = self.bits <= 4
        return self


class WeightOnlyConfig(LowBitWeightFields):
    method: Literal["weight_only"] = "weight_only"
    bits: Literal[4, 8] = 8
    symmetric: bool = True
    block_size: int | None = Field(None, ge=8, le=4096)  # blocks along the input dimension


class CodebookConfig(LowBitWeightFields):
    method: Literal["codebook"] = "codebook"
    bits: int = Field(4, ge=2, le=8)


QUANTIZE_SCHEMES: tuple[type[QuantizeStepConfig], ...] = (
    StaticInt8Config, DynamicInt8Config, Fp16Config, WeightOnlyConfig, CodebookConfig, QatConfig)
QuantizeConfig = Annotated[Union[QUANTIZE_SCHEMES], Field(discriminator="method")]  # noqa: UP007

# Every field of version 1's single QuantizeConfig.
_V1_FIELDS = {"method", "bits", "per_channel", "symmetric", "calibration", "percentile", "activation_type", "weight_type",
              "calibration_samples", "block_size", "keep_io_types", "exclude", "keep_first_last", "guard", "epochs", "lr",
              "batch_size", "distill", "seed"}


def _from_v1(params: dict) -> dict:
    scheme = {s.model_fields["method"].default: s for s in QUANTIZE_SCHEMES}.get(params["method"])
    # bits=None meant the method's default; fp16 could name its 16 bits.
    if params.get("bits", 0) is None or (scheme is Fp16Config and params.get("bits") == 16):
        params = {k: v for k, v in params.items() if k != "bits"}
    # Version 1 rejected bits that do not fit the method and block_size outside weight_only.
    return drop_ignored_v1_fields(params, scheme, _V1_FIELDS, rejected_when_given={"bits", "block_size"})


register_step_type("quantize", QuantizeConfig, default_method="static_int8", from_v1=_from_v1)
