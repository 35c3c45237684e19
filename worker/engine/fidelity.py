"""How closely a compressed model reproduces the original, for any output shape, labels or not.

One cosine over a whole tensor can stay at 0.998 while a small but vital part of it (the class
scores next to box coordinates in a detection head) has collapsed, so every output is also compared
slice by slice along each non-batch axis, and the worst slice is reported.
"""

import numpy as np


def is_class_scores(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] > 1


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """How often two models' class scores pick the same class."""
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(candidate, axis=1)))


def accuracy(scores: np.ndarray, labels: np.ndarray) -> dict | None:
    if not is_class_scores(scores):
        return None
    top = np.argsort(-scores, axis=1)
    result = {"top1": float(np.mean(top[:, 0] == labels)), "samples": int(len(labels))}
    if scores.shape[1] >= 5:
        result["top5"] = float(np.mean(np.any(top[:, :5] == labels[:, None], axis=1)))
    return result


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows; two all-zero rows count as identical."""
    dot = np.sum(a * b, axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same = np.all(a == b, axis=1)
    return np.where(same, 1.0, dot / np.maximum(norms, 1e-30))


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


# A slice whose RMS is under this fraction of the tensor's largest magnitude is float32 noise
# (~1e-7 next to ones). Relative to the magnitude, not the strongest slice: a detector's 0..1 score
# rows next to pixel box rows are signal and must stay in.
NEGLIGIBLE_RMS = 1e-5


def worst_slice(reference: np.ndarray, candidate: np.ndarray) -> dict | None:
    """The slice (one index along one non-batch axis, across the whole batch) whose values the
    candidate reproduces worst, by cosine similarity. Slices whose reference energy is negligible
    against the tensor's magnitude (values ~1e-7 next to ones) are noise, not signal, and are skipped."""
    worst = None
    for axis in range(1, reference.ndim):
        ref = np.moveaxis(reference, axis, 0).reshape(reference.shape[axis], -1)
        cand = np.moveaxis(candidate, axis, 0).reshape(candidate.shape[axis], -1)
        cosine = _cosine_rows(ref, cand)
        rms = np.sqrt(np.mean(np.square(ref), axis=1))
        cosine = np.where(rms > NEGLIGIBLE_RMS * np.max(np.abs(reference)), cosine, np.inf)
        if not np.isfinite(cosine).any():
            continue
        index = int(np.argmin(cosine))
        scale = float(np.max(np.abs(ref[index]))) or 1.0
        entry = {"axis": axis, "index": index, "cosine": float(cosine[index]),
                 "max_abs_error": float(np.max(np.abs(ref[index] - cand[index]))), "max_abs_reference": scale}
        if worst is None or entry["cosine"] < worst["cosine"]:
            worst = entry
    return worst


def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> list[dict]:
    results = []
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        ref64 = ref.astype(np.float64)
        cand64 = cand.astype(np.float64)
        cosine = _cosine_rows(ref64.reshape(len(ref64), -1), cand64.reshape(len(cand64), -1))
        entry = {
            "output": index,
            "shape": [None, *ref.shape[1:]],
            "cosine_mean": float(np.mean(cosine)),
            "cosine_min": float(np.min(cosine)),
            "max_abs_error": float(np.max(np.abs(ref64 - cand64))),
            "mean_abs_error": float(np.mean(np.abs(ref64 - cand64))),
            "worst_slice": worst_slice(ref64, cand64),
        }
        if is_class_scores(ref):
            entry["top1_agreement"] = top1_agreement(ref, cand)
            p, q = _softmax(ref64), _softmax(cand64)
            entry["kl_softmax"] = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
        results.append(entry)
    return results
