"""Fidelity per output group: the rows of one output that mean different things (a detector's pixel
box rows and its 0..1 score rows) judged apart, so that no part hides behind the whole."""

import numpy as np


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / norm)


def group_fidelity(reference: np.ndarray, candidate: np.ndarray, groups: dict[str, slice], axis: int = 1) -> dict:
    """Cosine and max abs error of each named slice of `axis`."""
    result = {}
    for name, rows in groups.items():
        ref = np.take(reference, np.arange(reference.shape[axis])[rows], axis=axis)
        cand = np.take(candidate, np.arange(candidate.shape[axis])[rows], axis=axis)
        result[name] = {"cosine": _cosine(ref, cand), "max_abs_error": float(np.max(np.abs(ref - cand))) if ref.size else 0.0}
    return result


def yolo_groups(rows: int, objectness: bool = False) -> dict[str, slice]:
    first_score = 5 if objectness else 4
    groups = {"boxes": slice(0, 4), "scores": slice(first_score, rows)}
    if objectness:
        groups["objectness"] = slice(4, 5)
    return groups
