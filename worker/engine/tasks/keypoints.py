"""Keypoints (pose, landmarks): the output decoded to points, and the compressed model's points
judged against the original's (label-free) or against `keypoints` labels.

Distances are normalised by a size (the task's `normalize`): "object", the diagonal of the box
the truth's visible keypoints span in that image; "extent", one diagonal over the whole eval set.
An image whose truth spans no box (one visible keypoint, or all at one place) takes the median of
the other images' diagonals, so a lone keypoint is still judged at a sensible scale."""

import numpy as np

# OKS-style score: exp(-d^2 / (2 s^2 k^2)) with s^2 the object's area (its keypoint box) and one
# constant k for every keypoint (COCO's per-keypoint sigmas are for human joints; k = 2 sigma, and
# 0.1 sits in the middle of COCO's range, 0.05 for eyes to 0.21 for hips).
OKS_K = 0.1


def decode(task, output: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(points (N, K, 2) float64 x, y; visibility (N, K) bool, or None when the layout has no third
    column). Heatmaps: each map's argmax cell as (column, row)."""
    output = np.asarray(output, np.float64)
    if task.layout == "heatmaps":
        count, keypoints, _, width = output.shape
        flat = output.reshape(count, keypoints, -1).argmax(axis=2)
        return np.stack([flat % width, flat // width], axis=2).astype(np.float64), None
    if task.layout == "flat":
        output = output.reshape(len(output), task.keypoints, -1)
    points = output[:, :, :2]
    if output.shape[2] < 3:
        return points, None
    confidence = output[:, :, 2]
    if task.visibility_activation == "sigmoid":
        confidence = 1.0 / (1.0 + np.exp(-np.clip(confidence, -60, 60)))
    return points, confidence >= task.visibility_threshold


def normalising_sizes(points: np.ndarray, visible: np.ndarray, normalize: str) -> np.ndarray:
    """(N,) the size each image's distances are divided by (see the module's note)."""
    def diagonal(chosen: np.ndarray) -> float:
        if len(chosen) < 2:
            return 0.0
        return float(np.linalg.norm(chosen.max(axis=0) - chosen.min(axis=0)))

    if normalize == "extent":
        size = diagonal(points[visible])
        return np.full(len(points), size if size > 0 else 1.0)
    sizes = np.array([diagonal(p[v]) for p, v in zip(points, visible)])
    positive = sizes[sizes > 0]
    fallback = float(np.median(positive)) if len(positive) else 1.0
    return np.where(sizes > 0, sizes, fallback)


def _distances(truth: np.ndarray, predicted: np.ndarray, visible: np.ndarray, normalize: str) -> np.ndarray:
    """Normalised distance of each truth-visible keypoint (flattened)."""
    sizes = normalising_sizes(truth, visible, normalize)
    distance = np.linalg.norm(predicted - truth, axis=2) / sizes[:, None]
    return distance[visible]


def keypoint_agreement(task, reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Label-free: PCK and mean normalised error of the compressed model's keypoints against the
    original's (those the original calls visible when the layout has a visibility column), and the
    fraction of keypoints whose visibility both models call the same."""
    ref_points, ref_visible = decode(task, reference)
    cand_points, cand_visible = decode(task, candidate)
    judged = np.ones(ref_points.shape[:2], bool) if ref_visible is None else ref_visible
    distance = _distances(ref_points, cand_points, judged, task.normalize)
    agreement = None if ref_visible is None else float(np.mean(ref_visible == cand_visible))
    return {"pck": float(np.mean(distance <= task.pck_threshold)) if distance.size else None,
            "mean_normalized_error": float(distance.mean()) if distance.size else None,
            "visibility_agreement": agreement, "keypoints_judged": int(distance.size),
            "pck_threshold": task.pck_threshold, "normalize": task.normalize}


def keypoint_scores(task, truth: np.ndarray, output: np.ndarray) -> dict:
    """Against labels (N, K, 2|3), a third column being COCO's visibility (0: not labelled):
    PCK at the task's threshold and at 0.2, mean normalised error, and mean OKS-style similarity
    per image (over its labelled keypoints), normalised by the labels' own keypoint boxes."""
    truth = np.asarray(truth, np.float64)
    labelled = np.ones(truth.shape[:2], bool) if truth.shape[2] < 3 else truth[:, :, 2] > 0
    points, _ = decode(task, output)
    distance = _distances(truth[:, :, :2], points, labelled, task.normalize)
    if not distance.size:
        return {"pck": None, "pck_0_2": None, "mean_normalized_error": None, "oks": None, "keypoints_labelled": 0}
    # OKS: s^2 the keypoint box's area; a box of area 0 (a lone keypoint) uses the squared size.
    sizes = normalising_sizes(truth[:, :, :2], labelled, task.normalize)
    squared = np.sum((points - truth[:, :, :2]) ** 2, axis=2)
    spans = [truth[i, labelled[i], :2] for i in range(len(truth))]
    areas = np.array([float(np.prod(s.max(axis=0) - s.min(axis=0))) if len(s) >= 2 else 0.0 for s in spans])
    areas = np.where(areas > 0, areas, sizes ** 2)
    similarity = np.exp(-squared / (2 * areas[:, None] * OKS_K ** 2))
    per_image = [similarity[i, labelled[i]].mean() for i in range(len(truth)) if labelled[i].any()]
    return {"pck": float(np.mean(distance <= task.pck_threshold)), "pck_0_2": float(np.mean(distance <= 0.2)),
            "mean_normalized_error": float(distance.mean()), "oks": float(np.mean(per_image)),
            "keypoints_labelled": int(distance.size)}
