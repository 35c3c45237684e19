"""Warnings a job's metrics carry when the compressed model lost much of its quality, so that the
report and the CLI say it loudly instead of a number among others (metrics["warnings"])."""

# A drop of more than this many top-1 points is flagged even when the job set no floor.
LARGE_DROP_POINTS = 5.0
# A prune without recovery that leaves less than this share of the original top-1 "lost most of it".
MOST_LOST_SHARE = 0.5


def quality_warnings(metrics: dict) -> list[dict]:
    """[{code, message}] for a large top-1 drop overall and for a prune step without recovery that
    lost most of the accuracy (it needs `finetune`)."""
    warnings = []
    before = (metrics.get("original") or {}).get("accuracy") or {}
    after = (metrics.get("compressed") or {}).get("accuracy") or {}
    if "top1" in before and "top1" in after:
        drop = 100 * (before["top1"] - after["top1"])
        if drop > LARGE_DROP_POINTS:
            warnings.append({"code": "large_accuracy_drop", "points": round(drop, 2),
                             "message": f"top-1 fell {drop:.1f} points ({before['top1']:.3f} -> {after['top1']:.3f}), "
                                        f"more than {LARGE_DROP_POINTS:g}"})
    for index, step in enumerate(metrics.get("steps", []), start=1):
        quality = step.get("quality") or {}
        if step.get("type") != "prune" or quality.get("after_recovery") is not None:
            continue
        start, pruned = (quality.get("before") or {}).get("top1"), (quality.get("after_pruning") or {}).get("top1")
        if start and pruned is not None and pruned < MOST_LOST_SHARE * start:
            warnings.append({"code": "prune_needs_recovery",
                             "message": f"step {index} (prune) took top-1 from {start:.3f} to {pruned:.3f} without recovery: "
                                        'add recovery training, e.g. "finetune": {"epochs": 2} in its params (needs --train data)'})
    return warnings
