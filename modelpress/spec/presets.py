"""Named recipes a user can pick without knowing the knobs: `"preset": "edge-int8"` in a job body
becomes these steps (recorded in the job and its recipe.json with every default filled in).

Presets are data. Steps that train use the labels when the training data has them; a step's
`unlabelled` params replace its own when it has none (label-free distillation from the original).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PresetStep:
    type: str
    params: dict
    unlabelled: dict | None = None  # params that change when the training data has no labels


@dataclass(frozen=True)
class Preset:
    description: str
    needs: tuple[str, ...]  # dataset roles (data.split provides all of them)
    recipe: tuple[PresetStep, ...]

    def steps(self, labelled: bool) -> list[dict]:
        return [{"type": step.type, "params": {**step.params, **({} if labelled else step.unlabelled or {})}}
                for step in self.recipe]


STATIC_INT8 = PresetStep("quantize", {"method": "static_int8"})


def _distill(epochs: int) -> PresetStep:
    return PresetStep("distill", {"epochs": epochs, "alpha": 0.5, "temperature": 4.0}, unlabelled={"alpha": 0.0})


def _prune_channels(ratio: float) -> PresetStep:
    return PresetStep("prune", {"method": "channels", "ratio": ratio, "round_to": 8})


PRESETS: dict[str, Preset] = {
    "int8": Preset("Static int8 (QDQ, calibrated, per-channel weights): about 4x smaller, int8 kernels on CPU.",
                   ("calibration",), (STATIC_INT8,)),
    "fp16": Preset("Half-precision weights and compute, fp32 inputs and outputs: 2x smaller, for GPUs.",
                   (), (PresetStep("quantize", {"method": "fp16"}),)),
    "edge-int8": Preset(
        "Prune 30% of the channels (widths rounded to multiples of 8), distil the pruned model from the original "
        "for 3 epochs, then static int8: about 6-8x smaller and faster on CPU.",
        ("train", "calibration"), (_prune_channels(0.3), _distill(3), STATIC_INT8)),
    "tiny-int8": Preset(
        "Prune 50% of the channels, distil for 5 epochs, then static int8: the smallest and fastest, "
        "at a larger accuracy cost.",
        ("train", "calibration"), (_prune_channels(0.5), _distill(5), STATIC_INT8)),
    "sparse": Preset(
        "80% unstructured magnitude sparsity with 2 epochs of distilled fine-tuning; the artifact also "
        "comes zstd-compressed (model.onnx.zst, about 4x smaller). No speed-up: for storage and download.",
        ("train",),
        (PresetStep("prune", {"method": "magnitude", "sparsity": 0.8, "finetune": {"epochs": 2, "distill": True}}),)),
}
