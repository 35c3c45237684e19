"""Segmentation agreement: the compressed model's masks against the original's argmax masks."""

import numpy as np


def masks(output: np.ndarray, layout: str = "logits") -> np.ndarray:
    return output.argmax(axis=1) if layout == "logits" else output.astype(np.int64)


def mask_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Pixel agreement and mIoU over the classes present in either mask set."""
    ref, cand = reference.ravel(), candidate.ravel()
    ious = []
    for label in np.union1d(np.unique(ref), np.unique(cand)):
        in_ref, in_cand = ref == label, cand == label
        ious.append(np.logical_and(in_ref, in_cand).sum() / np.logical_or(in_ref, in_cand).sum())
    return {"pixel_agreement": float(np.mean(ref == cand)), "miou": float(np.mean(ious)) if ious else 1.0}
