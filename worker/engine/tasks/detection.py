"""Detection agreement: the original's confident detections as ground truth for the compressed model's."""

import numpy as np

MAX_DETECTIONS = 300  # per image, after the confidence cut: bounds the O(n*m) matching
# The cut for detections ranked by mAP (COCO scores the low tail too; MAX_DETECTIONS still bounds them).
MAP_CONFIDENCE = 0.001


def decode_yolo(output: np.ndarray, *, channels_first: bool = True, box_format: str = "xywh",
                objectness: bool = False, confidence: float = 0.5) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: (boxes xyxy (K, 4), scores (K,), classes (K,)) of anchors at or above `confidence`."""
    rows = output if channels_first else np.swapaxes(output, 1, 2)  # (N, 4+[1]+C, A)
    decoded = []
    for image in rows.astype(np.float64):
        boxes, scores = image[:4].T, image[5 if objectness else 4:]
        if objectness:
            scores = scores * image[4]
        best = scores.max(axis=0)
        classes = scores.argmax(axis=0)
        keep = np.argsort(-best)[:MAX_DETECTIONS]
        keep = keep[best[keep] >= confidence]
        decoded.append((_as_xyxy(boxes[keep], box_format), best[keep], classes[keep]))
    return decoded


def _as_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    if box_format == "xyxy":
        return boxes
    cx, cy, w, h = boxes.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (K, 4 xyxy) with every box of `b` (M, 4)."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _match(ref, cand, iou: float) -> tuple[int, list[float]]:
    """Greedy, highest reference score first: same class, IoU ≥ `iou`, each candidate used once."""
    (ref_boxes, ref_scores, ref_classes), (cand_boxes, cand_scores, cand_classes) = ref, cand
    overlap = iou_matrix(ref_boxes, cand_boxes)
    used = np.zeros(len(cand_boxes), dtype=bool)
    matched, score_errors = 0, []
    for i in np.argsort(-ref_scores):
        fits = (overlap[i] >= iou) & (cand_classes == ref_classes[i]) & ~used
        if fits.any():
            j = int(np.argmax(np.where(fits, overlap[i], -1)))
            used[j] = True
            matched += 1
            score_errors.append(abs(float(ref_scores[i] - cand_scores[j])))
    return matched, score_errors


def detection_agreement(reference: list, candidate: list, *, iou: float = 0.5) -> dict:
    """Lost / new confident detections and the recall of the original's, over all images."""
    total_ref = total_cand = total_matched = 0
    errors: list[float] = []
    for ref, cand in zip(reference, candidate, strict=True):
        matched, score_errors = _match(ref, cand, iou)
        total_ref += len(ref[0])
        total_cand += len(cand[0])
        total_matched += matched
        errors += score_errors
    return {"reference_detections": total_ref, "candidate_detections": total_cand,
            "matched": total_matched, "lost": total_ref - total_matched, "new": total_cand - total_matched,
            "recall": total_matched / total_ref if total_ref else 1.0,
            "max_score_error": max(errors) if errors else 0.0}
