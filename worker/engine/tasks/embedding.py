"""Embedding agreement: cosine to the original's vectors and overlap of nearest neighbours."""

import numpy as np


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :k]


def embedding_agreement(reference: np.ndarray, candidate: np.ndarray, top_k: int = 5) -> dict:
    """Mean and min per-item cosine; mean fraction of each item's top-k neighbours kept."""
    ref, cand = _normalised(reference), _normalised(candidate)
    cosine = (ref * cand).sum(axis=1)
    k = min(top_k, len(ref) - 1)
    if k < 1:
        return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()), "neighbour_agreement": None}
    ref_nn, cand_nn = _neighbours(ref, k), _neighbours(cand, k)
    kept = [len(set(a) & set(b)) / k for a, b in zip(ref_nn, cand_nn)]
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "neighbour_agreement": float(np.mean(kept))}
