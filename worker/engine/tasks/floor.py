"""The safety floor: per-task minimums on the label-free fidelity below which a result is broken.

Defaults are deliberately strict on what users notice first: a lost confident detection, a changed
decoded string, a changed top-1 class. A job may set its own figures or switch the floor off.
"""

# (metric name, "min" or "max", default bound)
DEFAULT_FLOORS: dict[str, list[tuple[str, str, float]]] = {
    "classification": [("top1_agreement", "min", 0.99)],
    "detection": [("recall", "min", 0.95), ("scores_cosine", "min", 0.99)],
    "segmentation": [("pixel_agreement", "min", 0.98)],
    "ctc": [("exact_match", "min", 0.95)],
    "embedding": [("mean_cosine", "min", 0.99)],
}


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
