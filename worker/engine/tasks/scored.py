"""The task metric of the original and of the compressed model against the eval data's labels
(boxes, masks, label sequences or texts, verification pairs, keypoints), and how much the compression cost."""

import numpy as np

from modelpress.spec.configs.task import parse_task
from modelpress.spec.labels import IGNORE_INDEX, keypoint_summary, labels_misfit, text_ids
from worker.engine.data import Targets
from worker.engine.tasks import ctc, detection, keypoints, labelled, segmentation

# The figures compared, and which way is better: drop = original - compressed for a larger-is-better
# figure, compressed - original for CER, so a positive drop always means the compressed model is worse.
LARGER_IS_BETTER = {"map50": True, "map50_95": True, "map75": True, "miou": True, "pixel_accuracy": True,
                    "exact_match": True, "cer": False, "verification_accuracy": True,
                    "verification_accuracy_10fold": True, "pck": True, "pck_0_2": True, "oks": True,
                    "mean_normalized_error": False}


def decoded_detections(task, outputs: list[np.ndarray], confidence: float = detection.MAP_CONFIDENCE) -> list | None:
    """The model's detections down to `confidence` (the mAP cut unless told), suppressed and read as
    its decoder reads them (None: shapes that do not fit)."""
    decoder = task.decoder
    if decoder.kind == "yolo":
        output = outputs[(task.outputs or [0])[0]]
        if output.ndim != 3:
            return None
        return detection.decode_yolo(output, channels_first=decoder.layout == "channels_first", box_format=decoder.box_format,
                                     objectness=decoder.objectness, confidence=confidence, nms_iou=task.nms_iou,
                                     score_activation=decoder.score_activation)
    if max(decoder.boxes_output, decoder.scores_output) >= len(outputs):
        return None
    boxes = outputs[decoder.boxes_output]
    scores = detection.score_probabilities(outputs[decoder.scores_output], decoder.score_activation)
    if boxes.ndim != 3 or boxes.shape[2] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        return None
    return detection.decode_boxes_scores(boxes, scores, box_format=decoder.box_format, confidence=confidence,
                                         background_class=decoder.background_class, nms_iou=task.nms_iou)


def _detection(task, outputs: list[np.ndarray], targets: Targets) -> dict | None:
    predicted = None if targets.boxes is None else decoded_detections(task, outputs)
    if predicted is None:
        return None
    truth = [(targets.boxes[targets.box_images == i], targets.box_classes[targets.box_images == i]) for i in range(len(predicted))]
    return labelled.detection_map(truth, predicted)


def _segmentation(task, outputs: list[np.ndarray], targets: Targets) -> dict | None:
    output = outputs[(task.outputs or [0])[0]]
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


def _ctc(task, outputs: list[np.ndarray], targets: Targets) -> dict | None:
    output = outputs[(task.outputs or [0])[0]]
    truth = truth_sequences(task, targets)
    if truth is None or output.ndim != 3:
        return None
    predicted = ctc.greedy_decode(output, blank=task.blank, layout=task.layout)
    return labelled.ctc_scores(truth, predicted)


def _embedding(task, outputs: list[np.ndarray], targets: Targets) -> dict | None:
    if targets.pairs is None:
        return None
    return labelled.verification_accuracy(outputs[(task.outputs or [0])[0]], targets.pairs, targets.pair_same)


def _keypoints(task, outputs: list[np.ndarray], targets: Targets) -> dict | None:
    if targets.keypoints is None:
        return None
    output = outputs[(task.outputs or [0])[0]]
    if len(output) != len(targets.keypoints):
        return None
    return keypoints.keypoint_scores(task, targets.keypoints, output)


def label_summary(targets: Targets) -> dict:
    """What modelpress/spec/labels.py's fit check reads, from the arrays (the upload stored the same
    for the whole dataset): the worker checks again on the shapes the model really has."""
    summary = {}
    if targets.boxes is not None and len(targets.boxes):
        boxes = targets.boxes
        summary["boxes"] = {"max_class": int(targets.box_classes.max()), "min_x": float(boxes[:, 0].min()),
                            "min_y": float(boxes[:, 1].min()), "max_x": float(boxes[:, 2].max()), "max_y": float(boxes[:, 3].max())}
    if targets.masks is not None:
        classes = targets.masks[targets.masks != IGNORE_INDEX]
        summary["masks"] = {"height": targets.masks.shape[1], "width": targets.masks.shape[2],
                            "max_class": int(classes.max()) if classes.size else None}
    if targets.label_sequences is not None:
        summary["sequences"] = {"ids": sorted(int(i) for i in np.unique(targets.label_sequences[targets.label_sequences >= 0]))}
    if targets.texts is not None:
        summary["texts"] = {"characters": "".join(sorted(set("".join(targets.texts.tolist()))))}
    if targets.keypoints is not None:
        summary["keypoints"] = keypoint_summary(targets.keypoints)
    return summary


SCORES = {"detection": _detection, "segmentation": _segmentation, "ctc": _ctc, "embedding": _embedding,
          "keypoints": _keypoints}


def task_metrics(task: dict, reference: list[np.ndarray], candidate: list[np.ndarray], targets: Targets,
                 input_shape: list[int]) -> dict | None:
    """{"task", "original", "compressed", "drop"} when the targets hold labels of the task's kind
    (and the output fits its decoder), else None. `targets` are those of the images both ran on;
    labels that do not fit the outputs' real shapes (unknown at job creation) give a `note` instead."""
    parsed = parse_task(task)
    score = SCORES.get(parsed.type)
    index = (parsed.outputs or [0])[0]
    if score is None or index >= len(reference):
        return None
    problem = labels_misfit(parsed, label_summary(targets), count=len(reference[index]), input_shape=input_shape,
                            output_shapes=[list(output.shape) for output in reference])
    if problem is not None:
        return {"task": parsed.type, "original": None, "compressed": None, "drop": {},
                "note": f"the labels do not fit the model's outputs: {problem}"}
    before = score(parsed, [output.astype(np.float64) for output in reference], targets)
    if before is None:
        return None
    after = score(parsed, [output.astype(np.float64) for output in candidate], targets)
    drop = {}
    for name, larger in LARGER_IS_BETTER.items():
        if before.get(name) is not None and after.get(name) is not None:
            drop[name] = round(before[name] - after[name] if larger else after[name] - before[name], 9)
    return {"task": parsed.type, "original": before, "compressed": after, "drop": drop}
