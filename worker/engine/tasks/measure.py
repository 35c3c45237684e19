"""The task fidelity of one job: the task (given or inferred from the outputs, with the reason),
its label-free measures against the original, and the floors it misses (the runner enforces them:
worker/engine/tasks/floor.py)."""

import numpy as np

from modelpress.spec.configs.task import misfit, resolve_task
from modelpress.spec.floor import shortfalls
from worker.engine.fidelity import top1_agreement
from worker.engine.tasks import ctc, detection, embedding, groups, keypoints, labelled, segmentation


def _classification(task, ref: np.ndarray, cand: np.ndarray) -> dict:
    return {"top1_agreement": top1_agreement(ref.reshape(len(ref), -1), cand.reshape(len(cand), -1))}


def _detection(task, ref: np.ndarray, cand: np.ndarray) -> dict | None:
    decoder = task.decoder
    if decoder.kind != "yolo" or ref.ndim != 3:
        return None  # boxes_scores reads two outputs: _boxes_scores
    channels_first = decoder.layout == "channels_first"
    rows = ref.shape[1] if channels_first else ref.shape[2]
    if rows < (6 if decoder.objectness else 5):
        return None
    options = {"channels_first": channels_first, "box_format": decoder.box_format,
               "objectness": decoder.objectness, "confidence": task.confidence, "score_activation": decoder.score_activation}
    confident = detection.decode_yolo(ref, **options)
    agreement = detection.detection_agreement(confident, detection.decode_yolo(cand, **options), iou=task.iou)
    # mAP of the compressed model's ranked detections, the original's confident ones as the truth,
    # both suppressed as a deployment would: COCO ranks the low-score tail too, so the candidate is
    # decoded at a low cut.
    truth = detection.decode_yolo(ref, **{**options, "nms_iou": task.nms_iou})
    ranked = detection.decode_yolo(cand, **{**options, "confidence": detection.MAP_CONFIDENCE, "nms_iou": task.nms_iou})
    scored = labelled.detection_map([(boxes, classes) for boxes, _, classes in truth], ranked)
    per_group = groups.group_fidelity(ref, cand, groups.yolo_groups(rows, decoder.objectness), axis=1 if channels_first else 2)
    return {**agreement, "map50": scored["map50"], "map50_95": scored["map50_95"],
            "groups": per_group, "scores_cosine": per_group["scores"]["cosine"]}


def _boxes_scores(task, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict | None:
    """SSD-style: the decoder's boxes (N, A, 4) and scores (N, A, C) outputs, each its own group.
    The score group is read as the decoder reads it (activated, the background column left out)."""
    decoder = task.decoder
    ref_boxes, cand_boxes = reference[decoder.boxes_output], candidate[decoder.boxes_output]
    ref_scores, cand_scores = (detection.score_probabilities(outputs[decoder.scores_output], decoder.score_activation)
                               for outputs in (reference, candidate))
    if ref_boxes.ndim != 3 or ref_boxes.shape[2] != 4 or ref_scores.ndim != 3 or ref_scores.shape[:2] != ref_boxes.shape[:2]:
        return None
    options = {"box_format": decoder.box_format, "confidence": task.confidence, "background_class": decoder.background_class}
    confident = detection.decode_boxes_scores(ref_boxes, ref_scores, **options)
    agreement = detection.detection_agreement(confident, detection.decode_boxes_scores(cand_boxes, cand_scores, **options),
                                              iou=task.iou)
    truth = detection.decode_boxes_scores(ref_boxes, ref_scores, **{**options, "nms_iou": task.nms_iou})
    ranked = detection.decode_boxes_scores(cand_boxes, cand_scores, **{**options, "confidence": detection.MAP_CONFIDENCE,
                                                                      "nms_iou": task.nms_iou})
    scored = labelled.detection_map([(boxes, classes) for boxes, _, classes in truth], ranked)
    classes = np.arange(ref_scores.shape[2]) != decoder.background_class
    per_group = {**groups.group_fidelity(ref_boxes, cand_boxes, {"boxes": slice(None)}, axis=2),
                 **groups.group_fidelity(ref_scores, cand_scores, {"scores": classes}, axis=2)}
    return {**agreement, "map50": scored["map50"], "map50_95": scored["map50_95"],
            "groups": per_group, "scores_cosine": per_group["scores"]["cosine"]}


def _segmentation(task, ref: np.ndarray, cand: np.ndarray) -> dict | None:
    if ref.ndim != (4 if task.layout == "logits" else 3):
        return None
    return segmentation.mask_agreement(segmentation.masks(ref, task.layout), segmentation.masks(cand, task.layout))


def _ctc(task, ref: np.ndarray, cand: np.ndarray) -> dict | None:
    if ref.ndim != 3:
        return None
    return ctc.string_agreement(ctc.greedy_decode(ref, blank=task.blank, layout=task.layout),
                                ctc.greedy_decode(cand, blank=task.blank, layout=task.layout))


def _embedding(task, ref: np.ndarray, cand: np.ndarray) -> dict:
    return embedding.embedding_agreement(ref, cand, task.top_k)


def _keypoints(task, ref: np.ndarray, cand: np.ndarray) -> dict:
    return keypoints.keypoint_agreement(task, ref, cand)  # the layout was checked against these shapes (misfit)


MEASURES = {"classification": _classification, "detection": _detection, "segmentation": _segmentation,
            "ctc": _ctc, "embedding": _embedding, "keypoints": _keypoints}


def task_fidelity(reference: list[np.ndarray], candidate: list[np.ndarray], given: dict | None = None,
                  floor_overrides: dict[str, float] | None = None) -> dict:
    shapes = [tuple(r.shape) for r in reference]
    resolved = resolve_task(given, shapes)
    task = resolved.task
    index = (task.outputs or [0])[0]
    result = {"task": task.model_dump(), "inferred": resolved.inferred, "reason": resolved.reason}
    problem = misfit(task, shapes)
    if problem is not None:  # only a given task can miss: an inferred one is read off these shapes
        return {**result, "fidelity": None, "fits": False, "note": problem}
    measure = MEASURES.get(task.type)
    if task.type == "detection" and task.decoder.kind == "boxes_scores":  # reads two outputs, not one
        figures = _boxes_scores(task, [r.astype(np.float64) for r in reference], [c.astype(np.float64) for c in candidate])
    elif measure is None or index >= len(reference):
        return {**result, "fidelity": None}
    else:
        figures = measure(task, reference[index].astype(np.float64), candidate[index].astype(np.float64))
    if figures is None:
        return {**result, "fidelity": None, "note": "the output's shape does not fit the task's decoder"}
    return {**result, "fidelity": figures, "floor_shortfalls": shortfalls(task.type, figures, floor_overrides)}
