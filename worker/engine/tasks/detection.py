"""Detection agreement: the original's confident detections as ground truth for the compressed model's."""

import numpy as np

MAX_DETECTIONS = 300  # per image, after the confidence cut: bounds the O(n*m) matching
# The cut for detections ranked by mAP (COCO scores the low tail too; MAX_DETECTIONS still bounds them).
MAP_CONFIDENCE = 0.001
PRE_NMS_DETECTIONS = 3000  # per image, best first, that non-maximum suppression looks at


def decode_yolo(output: np.ndarray, *, channels_first: bool = True, box_format: str = "xywh", objectness: bool = False,
                confidence: float = 0.5, nms_iou: float | None = None,
                score_activation: str = "none") -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: (boxes xyxy (K, 4), scores (K,), classes (K,)) of anchors at or above `confidence`;
    `score_activation` "sigmoid" for heads that export logits (objectness included)."""
    rows = (output if channels_first else np.swapaxes(output, 1, 2)).astype(np.float64)  # (N, 4+[1]+C, A)
    scores = score_probabilities(rows[:, 5 if objectness else 4:], score_activation)
    if objectness:
        scores = scores * score_probabilities(rows[:, 4:5], score_activation)
    return decode_boxes_scores(np.swapaxes(rows[:, :4], 1, 2), np.swapaxes(scores, 1, 2), box_format=box_format,
                               confidence=confidence, nms_iou=nms_iou)


def score_probabilities(scores: np.ndarray, activation: str = "none") -> np.ndarray:
    """Scores (..., C) as the decoder reads them: as given, sigmoid per class, or softmax over the classes."""
    scores = scores.astype(np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-scores))
    if activation == "softmax":
        shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return scores


def decode_boxes_scores(boxes: np.ndarray, scores: np.ndarray, *, box_format: str = "xyxy", confidence: float = 0.5,
                        background_class: int | None = None, nms_iou: float | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Boxes (N, A, 4) and class probabilities (N, A, C), per image: (boxes xyxy (K, 4), scores (K,),
    classes (K,)) of the anchors whose best class scores at or above `confidence`. The background
    class, if any, is never a detection (its column is left out of the best class; ids keep their place).
    `nms_iou`: class-wise non-maximum suppression at that IoU first (a raw YOLO-style output holds
    several anchors per object; deployments and COCO evaluation suppress them)."""
    scores = scores.astype(np.float64)
    if background_class is not None:
        scores = scores.copy()
        scores[..., background_class] = -np.inf
    decoded = []
    for image_boxes, image_scores in zip(boxes.astype(np.float64), scores, strict=True):
        best = image_scores.max(axis=1)
        classes = image_scores.argmax(axis=1)
        keep = np.argsort(-best)[:MAX_DETECTIONS if nms_iou is None else PRE_NMS_DETECTIONS]
        keep = keep[best[keep] >= confidence]
        image_boxes = _as_xyxy(image_boxes[keep], box_format)
        if nms_iou is not None:
            kept = _suppressed(image_boxes, classes[keep], nms_iou)
            image_boxes, keep = image_boxes[kept], keep[kept]
        decoded.append((image_boxes, best[keep], classes[keep]))
    return decoded


def _suppressed(boxes: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy class-wise NMS of boxes already ranked by score, at most MAX_DETECTIONS."""
    remaining, kept = np.arange(len(boxes)), []
    while len(remaining) and len(kept) < MAX_DETECTIONS:
        top, rest = remaining[0], remaining[1:]
        kept.append(top)
        overlap = iou_matrix(boxes[top:top + 1], boxes[rest])[0]
        remaining = rest[(overlap <= iou) | (classes[rest] != classes[top])]
    return np.asarray(kept, dtype=np.int64)


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


def matched_pairs(ref, cand, iou: float) -> list[tuple[int, int]]:
    """(reference index, candidate index) of each match. Greedy, highest reference score first:
    same class, IoU ≥ `iou`, each candidate used once."""
    (ref_boxes, ref_scores, ref_classes), (cand_boxes, _, cand_classes) = ref, cand
    overlap = iou_matrix(ref_boxes, cand_boxes)
    used = np.zeros(len(cand_boxes), dtype=bool)
    pairs = []
    for i in np.argsort(-ref_scores):
        fits = (overlap[i] >= iou) & (cand_classes == ref_classes[i]) & ~used
        if fits.any():
            j = int(np.argmax(np.where(fits, overlap[i], -1)))
            used[j] = True
            pairs.append((int(i), j))
    return pairs


def _match(ref, cand, iou: float) -> tuple[int, list[float]]:
    pairs = matched_pairs(ref, cand, iou)
    return len(pairs), [abs(float(ref[1][i] - cand[1][j])) for i, j in pairs]


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
