"""Task metrics against labels: detection mAP (COCO), segmentation mIoU, CTC exact match and CER,
embedding verification accuracy. Pure numpy functions of the truth and the model's decoded output;
the label-free measures beside them (measure.py) use the original's output as the truth instead."""

import contextlib
import io

import numpy as np

from worker.engine.tasks.ctc import string_agreement


def detection_map(truth: list[tuple[np.ndarray, np.ndarray]],
                  predicted: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """COCO box mAP: 101-point interpolated precision, IoU 0.50:0.05:0.95, area "all", 100
    detections per image (the highest scores), averaged over the classes present in the truth.

    `truth` per image: (boxes xyxy (K, 4), classes (K,)); `predicted` per image: (boxes xyxy (M, 4),
    scores (M,), classes (M,)), as detection.decode_yolo returns them. Predicted classes absent from
    the truth are not scored (COCO's rule). With no truth box at all the mAPs are None."""
    images = len(truth)
    truth_boxes = int(sum(len(boxes) for boxes, _ in truth))
    result = {"images": images, "truth_boxes": truth_boxes}
    if truth_boxes == 0:
        return {**result, "map50": None, "map50_95": None, "map75": None}
    if not any(len(p[0]) for p in predicted):
        return {**result, "map50": 0.0, "map50_95": 0.0, "map75": 0.0}
    stats = _coco_box_stats(truth, predicted)
    return {**result, "map50": float(stats[1]), "map50_95": float(stats[0]), "map75": float(stats[2])}


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _coco_box_stats(truth, predicted) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    annotations, detections, classes = [], [], set()
    for image_id, ((boxes, labels), (pred_boxes, scores, pred_labels)) in enumerate(zip(truth, predicted, strict=True)):
        for box, label in zip(_xywh(boxes), np.asarray(labels).ravel()):
            classes.add(int(label))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0})
        for box, score, label in zip(_xywh(pred_boxes), np.asarray(scores).ravel(), np.asarray(pred_labels).ravel()):
            detections.append({"image_id": image_id, "category_id": int(label), "bbox": box.tolist(),
                               "score": float(score)})
    dataset = {"images": [{"id": i} for i in range(len(truth))], "annotations": annotations,
               "categories": [{"id": c} for c in sorted(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # the library reports its progress on stdout
        ground_truth = COCO(dataset)
        evaluator = COCOeval_faster(ground_truth, ground_truth.loadRes(detections), iouType="bbox",
                                    print_function=lambda *args, **kwargs: None)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def segmentation_scores(truth: np.ndarray, predicted: np.ndarray, ignore_index: int = 255) -> dict:
    """Masks (N, H, W) of class ids: mean IoU over the classes present in the truth or the
    prediction, and pixel accuracy; truth pixels equal to `ignore_index` count for neither."""
    truth, predicted = np.asarray(truth).ravel(), np.asarray(predicted).ravel()
    if truth.shape != predicted.shape:
        raise ValueError(f"truth and predicted masks differ in size ({truth.size} and {predicted.size} pixels)")
    valid = truth != ignore_index
    truth, predicted = truth[valid].astype(np.int64), predicted[valid].astype(np.int64)
    if truth.size == 0:
        return {"miou": None, "pixel_accuracy": None}
    # One confusion matrix over the classes seen: intersection on its diagonal, union = row + column - diagonal.
    classes, codes = np.unique(np.concatenate([truth, predicted]), return_inverse=True)
    count = len(classes)
    confusion = np.bincount(codes[: truth.size] * count + codes[truth.size :], minlength=count * count).reshape(count, count)
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    return {"miou": float(np.mean(intersection / union)), "pixel_accuracy": float(intersection.sum() / truth.size)}


def ctc_scores(truth: list[tuple[int, ...]], predicted: list[tuple[int, ...]]) -> dict:
    """Exact-match fraction and character error rate (edit distance / truth characters)."""
    return string_agreement(truth, predicted)


def _best_threshold(similarity: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of "same when similarity >= threshold"."""
    order = np.argsort(-similarity, kind="stable")
    ranked, ranked_same = similarity[order], same[order]
    # Calling the first k pairs "same": correct = same among them + different among the rest.
    same_in_top = np.concatenate([[0], np.cumsum(ranked_same)])
    different_total = int((~same).sum())
    different_in_top = np.arange(len(ranked) + 1) - same_in_top
    correct = same_in_top + (different_total - different_in_top)
    # A cut is only possible between distinct similarities.
    cuts = np.concatenate([[True], ranked[1:] < ranked[:-1], [True]])
    k = int(np.argmax(np.where(cuts, correct, -1)))
    if k == 0:
        threshold = float(ranked[0]) + 1e-6
    elif k == len(ranked):
        threshold = float(ranked[-1])
    else:
        threshold = float((ranked[k - 1] + ranked[k]) / 2)
    return threshold, float(correct[k] / len(ranked))


def verification_accuracy(embeddings: np.ndarray, pairs: np.ndarray, same: np.ndarray) -> dict:
    """Face-verification style: cosine similarity of each pair's embeddings, "same" at or above a
    threshold. `verification_accuracy` is the accuracy at the best threshold on these pairs (the
    usual LFW-style figure without folds, an upper bound on a held-out threshold's);
    `verification_accuracy_10fold` is LFW's protocol: the threshold chosen on nine tenths of the
    pairs, accuracy measured on the other tenth, averaged over the ten folds (None under 10 pairs)."""
    vectors = np.asarray(embeddings, np.float64).reshape(len(embeddings), -1)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    same = np.asarray(same).astype(bool).ravel()
    if len(pairs) == 0:
        return {"verification_accuracy": None, "verification_accuracy_10fold": None, "threshold": None, "pairs": 0}
    similarity = (vectors[pairs[:, 0]] * vectors[pairs[:, 1]]).sum(axis=1)
    threshold, accuracy = _best_threshold(similarity, same)
    folded = None
    if len(pairs) >= 10:
        folds = np.array_split(np.arange(len(pairs)), 10)
        scores = []
        for held_out in folds:
            rest = np.setdiff1d(np.arange(len(pairs)), held_out)
            fold_threshold, _ = _best_threshold(similarity[rest], same[rest])
            scores.append(np.mean((similarity[held_out] >= fold_threshold) == same[held_out]))
        folded = float(np.mean(scores))
    return {"verification_accuracy": accuracy, "verification_accuracy_10fold": folded,
            "threshold": threshold, "pairs": int(len(pairs))}
