"""The task metric of the original and of the compressed model against the eval data's labels
(boxes, masks, label sequences or texts, verification pairs), and how much the compression cost."""

import numpy as np

from modelpress.spec.configs.task import parse_task
from modelpress.spec.labels import text_ids
from worker.engine.data import Targets
from worker.engine.tasks import ctc, detection, labelled, segmentation

# The figures compared, and which way is better: drop = original - compressed for a larger-is-better
# figure, compressed - original for CER, so a positive drop always means the compressed model is worse.
LARGER_IS_BETTER = {"map50": True, "map50_95": True, "map75": True, "miou": True, "pixel_accuracy": True,
                    "exact_match": True, "cer": False, "verification_accuracy": True,
                    "verification_accuracy_10fold": True}


def _detection(task, output: np.ndarray, targets: Targets) -> dict | None:
    decoder = task.decoder
    if targets.boxes is None or decoder.kind != "yolo" or output.ndim != 3:
        return None
    truth = [(targets.boxes[targets.box_images == i], targets.box_classes[targets.box_images == i]) for i in range(len(output))]
    predicted = detection.decode_yolo(output, channels_first=decoder.layout == "channels_first", box_format=decoder.box_format,
                                      objectness=decoder.objectness, confidence=detection.MAP_CONFIDENCE)
    return labelled.detection_map(truth, predicted)


def _segmentation(task, output: np.ndarray, targets: Targets) -> dict | None:
    if targets.masks is None or output.ndim != (4 if task.layout == "logits" else 3):
        return None
    predicted = segmentation.masks(output, task.layout)
    if predicted.shape != targets.masks.shape:
        return None  # refused at job creation when the output size was known; unknown until now otherwise
    return labelled.segmentation_scores(targets.masks, predicted)


def truth_sequences(task, targets: Targets) -> list[tuple[int, ...]] | None:
    if targets.label_sequences is not None:
        return [tuple(int(c) for c in row if c >= 0) for row in targets.label_sequences]
    if targets.texts is not None and task.alphabet is not None:
        ids = text_ids(task.alphabet, task.blank)
        return [tuple(ids[c] for c in text) for text in targets.texts.tolist()]
    return None


def _ctc(task, output: np.ndarray, targets: Targets) -> dict | None:
    truth = truth_sequences(task, targets)
    if truth is None or output.ndim != 3:
        return None
    predicted = ctc.greedy_decode(output, blank=task.blank, layout=task.layout)
    return labelled.ctc_scores(truth, predicted)


def _embedding(task, output: np.ndarray, targets: Targets) -> dict | None:
    if targets.pairs is None:
        return None
    return labelled.verification_accuracy(output, targets.pairs, targets.pair_same)


SCORES = {"detection": _detection, "segmentation": _segmentation, "ctc": _ctc, "embedding": _embedding}


def task_metrics(task: dict, reference: list[np.ndarray], candidate: list[np.ndarray], targets: Targets) -> dict | None:
    """{"task", "original", "compressed", "drop"} when the targets hold labels of the task's kind
    (and the output fits its decoder), else None. `targets` are those of the images both ran on."""
    parsed = parse_task(task)
    score = SCORES.get(parsed.type)
    index = (parsed.outputs or [0])[0]
    if score is None or index >= len(reference):
        return None
    before = score(parsed, reference[index].astype(np.float64), targets)
    if before is None:
        return None
    after = score(parsed, candidate[index].astype(np.float64), targets)
    drop = {}
    for name, larger in LARGER_IS_BETTER.items():
        if before.get(name) is not None and after.get(name) is not None:
            drop[name] = round(before[name] - after[name] if larger else after[name] - before[name], 9)
    return {"task": parsed.type, "original": before, "compressed": after, "drop": drop}
