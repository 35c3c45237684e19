"""Named recipes a user can pick without knowing the knobs: `"preset": "edge-int8"` in a job body
becomes these steps (recorded in the job and its recipe.json with every default filled in).

Steps that train use the labels when the training data has them and learn from the original
model alone (label-free distillation) when it has none.
"""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    description: str
    needs: tuple[str, ...]  # dataset roles (data.split provides all of them)
    steps: Callable[[bool], list[dict]]  # labelled training data -> steps


def _distill(epochs: int, labelled: bool) -> dict:
    return {"type": "distill", "params": {"epochs": epochs, "alpha": 0.5 if labelled else 0.0, "temperature": 4.0}}


PRESETS: dict[str, Preset] = {
    "int8": Preset("Static int8 (QDQ, calibrated, per-channel weights): about 4x smaller, int8 kernels on CPU.",
                   ("calibration",), lambda labelled: [{"type": "quantize", "params": {"method": "static_int8"}}]),
    "fp16": Preset("Half-precision weights and compute, fp32 inputs and outputs: 2x smaller, for GPUs.",
                   (), lambda labelled: [{"type": "quantize", "params": {"method": "fp16"}}]),
    "edge-int8": Preset(
        "Prune 30% of the channels (widths rounded to multiples of 8), distil the pruned model from the original "
        "for 3 epochs, then static int8: about 6-8x smaller and faster on CPU.",
        ("train", "calibration"),
        lambda labelled: [{"type": "prune", "params": {"method": "channels", "ratio": 0.3, "round_to": 8}},
                          _distill(3, labelled),
                          {"type": "quantize", "params": {"method": "static_int8"}}]),
    "tiny-int8": Preset(
        "Prune 50% of the channels, distil for 5 epochs, then static int8: the smallest and fastest, "
        "at a larger accuracy cost.",
        ("train", "calibration"),
        lambda labelled: [{"type": "prune", "params": {"method": "channels", "ratio": 0.5, "round_to": 8}},
                          _distill(5, labelled),
                          {"type": "quantize", "params": {"method": "static_int8"}}]),
    "sparse": Preset(
        "80% unstructured magnitude sparsity with 2 epochs of distilled fine-tuning; the artifact also "
        "comes zstd-compressed (model.onnx.zst, about 4x smaller). No speed-up: for storage and download.",
        ("train",),
        lambda labelled: [{"type": "prune", "params": {"method": "magnitude", "sparsity": 0.8,
                                                       "finetune": {"epochs": 2, "distill": True}}}]),
}
