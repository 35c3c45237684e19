"""The safety floor: per-task minimums on the label-free fidelity below which a result is broken.

On by default: a job whose final model misses its task's floor ends `failed` with
`fidelity_floor_not_met` (its artifacts and metrics still stored). A job sets `"floor": "off"`, or
its own bounds as `{"metric": bound}`. Torch-free: the API checks the names, the worker judges.

Calibration. The bounds separate a healthy compression from a broken one; they are not a quality
target (a guard, `min_top1_agreement`, is that). Measured on the reference digits classifier
(360 eval images): static int8 keeps 1.0 of its top-1 predictions, the tiny-int8 preset 0.989,
the sparse preset 0.983; a broken model (channel pruning at 0.5 or 0.9 without finetuning) keeps
0.08-0.11, chance on 10 classes. 0.99 failed those healthy int8 and sparse results (it allows 3
changed predictions in 360), so classification's bound is 0.95: one changed prediction in 20 is
far past quantization noise and far above a broken model. The others keep the strict bounds of
the first design: a lost confident detection, a changed decoded string, a moved embedding are what
users notice first, and no test shows them wrong.
"""

from typing import Annotated, Literal

from pydantic import Field

# task type -> [(metric name, "min" or "max", default bound)]
DEFAULT_FLOORS: dict[str, list[tuple[str, str, float]]] = {
    "classification": [("top1_agreement", "min", 0.95)],
    "detection": [("recall", "min", 0.95), ("scores_cosine", "min", 0.99)],
    "segmentation": [("pixel_agreement", "min", 0.98)],
    "ctc": [("exact_match", "min", 0.95)],
    "embedding": [("mean_cosine", "min", 0.99)],
    "keypoints": [("pck", "min", 0.9)],
}

FLOOR_METRICS = sorted({metric for floors in DEFAULT_FLOORS.values() for metric, _, _ in floors})

# "default": the bounds above; "off": never fails a job (still measured and reported); a dict: the
# floor on, with these bounds replacing the defaults of the metrics it names.
FloorSpec = Literal["default", "off"] | dict[Annotated[str, Field(max_length=64)], Annotated[float, Field(ge=-1.0, le=1.0)]]


def unknown_metrics(floor) -> list[str]:
    """The names in a floor's overrides that no task's floor has (a typo would silently not apply)."""
    return sorted(set(floor) - set(FLOOR_METRICS)) if isinstance(floor, dict) else []


def shortfalls(task_type: str, fidelity: dict, overrides: dict[str, float] | None = None) -> list[dict]:
    """Every floor the fidelity misses, with the figure and the bound; empty when it meets them all.
    A metric the fidelity lacks (not measured) is reported as missed, never silently passed."""
    missed = []
    for metric, direction, default in DEFAULT_FLOORS.get(task_type, []):
        bound = (overrides or {}).get(metric, default)
        value = fidelity.get(metric)
        ok = value is not None and (value >= bound if direction == "min" else value <= bound)
        if not ok:
            missed.append({"metric": metric, "value": value, "bound": bound, "direction": direction})
    return missed


def margin(task_type: str, fidelity: dict, overrides: dict[str, float] | None = None) -> float | None:
    """How far the fidelity lies above its floor: the smallest slack over the floor's metrics
    (negative when one is missed, -inf when one is not measured); None when the task has no floor.
    A search ranks candidates that all miss the floor by it."""
    slacks = []
    for metric, direction, default in DEFAULT_FLOORS.get(task_type, []):
        bound, value = (overrides or {}).get(metric, default), fidelity.get(metric)
        slacks.append(float("-inf") if value is None else (value - bound if direction == "min" else bound - value))
    return min(slacks) if slacks else None
