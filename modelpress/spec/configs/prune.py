"""Configs of the `prune` step, one per kind of pruning (`method`), and the recovery training.

magnitude: zero the smallest weights (|w|) of every Conv/Gemm/MatMul, per layer or globally,
  to `sparsity`; the artifact also comes zstd-compressed (model.onnx.zst), where zeros pay off.
n_m: keep the `n` largest of every `m` consecutive weights along the input dimension (2:4).
channels: remove whole channels (default 30% of each prunable group, rounded to multiples of
  `round_to` so the kernels stay fast); or give `target_macs` / `target_params` as the fraction
  of the original to keep and the step finds the ratio.
"""

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, model_validator

from modelpress.spec.configs.base import StepConfig, drop_ignored_v1_fields, register_step_type
from modelpress.spec.configs.training import Epochs, LearningRate, Seed, TrainingSpec


class FinetuneSpec(TrainingSpec):
    """Recovery training after pruning, on data.train: `distill` learns from the unpruned model's
    outputs as well as the labels (only from them when the data has no labels)."""

    epochs: Epochs = 2
    # Measured on Fashion-MNIST at 50% fewer MACs, one epoch: 3e-3 recovered MobileNet to 0.849 and
    # ResNet to 0.881 top-1; 1e-3 left MobileNet at 0.763.
    lr: LearningRate = 3e-3
    distill: bool = False


class PruneStepConfig(StepConfig):
    """What every kind of pruning takes: layers left as they are and optional recovery training."""

    exclude: list[str] = Field(default_factory=list, max_length=1000)  # node names or op types left as they are
    finetune: FinetuneSpec | None = None
    seed: Seed = 0  # of the recovery training

    def wants_gpu(self) -> bool:
        return self.finetune is not None

    def required_data(self) -> set[str]:
        return {"train"} if self.finetune else set()

    def required_labels(self) -> set[str]:
        return {"train"} if self.finetune and not self.finetune.distill else set()


class MagnitudePruneConfig(PruneStepConfig):
    method: Literal["magnitude"] = "magnitude"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    scope: Literal["layer", "global"] = "layer"
    min_weights: int = Field(1024, ge=0, le=1 << 30)  # smaller layers are left (and listed)
    # Iterative schedule: prune a share, fine-tune, repeat (cubic sparsity ramp).
    iterations: int = Field(1, ge=1, le=20)


class NMPruneConfig(PruneStepConfig):
    method: Literal["n_m"] = "n_m"
    n: int = Field(2, ge=1, le=64)
    m: int = Field(4, ge=2, le=64)
    min_weights: int = Field(1024, ge=0, le=1 << 30)  # smaller layers are left (and listed)
    iterations: ClassVar[int] = 1  # n_m prunes in one step

    @model_validator(mode="after")
    def _n_below_m(self) -> "NMPruneConfig":
        if self.n >= self.m:
            raise ValueError(f"n must be smaller than m (got n={self.n}, m={self.m})")
        return self


class ChannelPruneConfig(PruneStepConfig):
    method: Literal["channels"] = "channels"
    ratio: float | None = Field(None, ge=0.0, lt=1.0)  # fraction of each group's channels removed
    target_macs: float | None = Field(None, gt=0.0, le=1.0)  # fraction of the original MACs to keep
    target_params: float | None = Field(None, gt=0.0, le=1.0)  # fraction of the original parameters
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    round_to: int = Field(8, ge=1, le=256)
    # Iterative schedule: prune a share, fine-tune, repeat.
    iterations: int = Field(1, ge=1, le=20)

    @model_validator(mode="after")
    def _one_target(self) -> "ChannelPruneConfig":
        targets = [k for k in ("ratio", "target_macs", "target_params") if getattr(self, k) is not None]
        if len(targets) > 1:
            raise ValueError(f"give one of ratio, target_macs, target_params (got {', '.join(targets)})")
        if not targets:
            self.ratio = 0.3
        return self

    def required_data(self) -> set[str]:
        if self.finetune:
            return {"train"}  # taylor importance also takes its gradients from the train data
        return {"calibration"} if self.importance == "taylor" else set()


PRUNE_SCHEMES: tuple[type[PruneStepConfig], ...] = (MagnitudePruneConfig, NMPruneConfig, ChannelPruneConfig)
PruneConfig = Annotated[Union[PRUNE_SCHEMES], Field(discriminator="method")]  # noqa: UP007

# Every field of version 1's single PruneConfig.
_V1_FIELDS = {"method", "sparsity", "scope", "min_weights", "n", "m", "ratio", "target_macs", "target_params", "importance",
              "round_to", "exclude", "finetune", "iterations", "seed"}


def _from_v1(params: dict) -> dict:
    scheme = {s.model_fields["method"].default: s for s in PRUNE_SCHEMES}.get(params["method"])
    if scheme is NMPruneConfig and params.get("iterations") == 1:
        params = {k: v for k, v in params.items() if k != "iterations"}
    # Version 1 rejected a channel target outside channels and iterations other than 1 for n_m.
    return drop_ignored_v1_fields(params, scheme, _V1_FIELDS,
                                  rejected_when_given={"ratio", "target_macs", "target_params", "iterations"})


register_step_type("prune", PruneConfig, default_method="channels", from_v1=_from_v1)
