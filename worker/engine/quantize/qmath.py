"""Quantization arithmetic: uniform (affine and symmetric) and non-uniform (k-means codebook,
power-of-two), per tensor, per channel along any axis, or per group of `group_size` along an axis.

Conventions (the ones ONNX QuantizeLinear/DequantizeLinear use):
    q = clip(round(x / scale) + zero_point, qmin, qmax)        x' = (q - zero_point) * scale
The range is widened to include 0, and the zero point is an integer, so 0.0 is exactly
representable (padding and ReLU zeros stay exact). Inside the range the round-trip error is at most
scale / 2; outside it values clip to the nearest end.
"""

from dataclasses import dataclass

import numpy as np


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@dataclass(frozen=True)
class QParams:
    scale: np.ndarray  # broadcastable against the tensor
    zero_point: np.ndarray  # integers, same shape as scale
    qmin: int
    qmax: int


def _grouped(x: np.ndarray, axis: int | None, group_size: int | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Reduction axes for per-tensor (axis None), per-channel (axis), per-group (axis + group_size:
    groups of consecutive elements along `axis`). Returns the view to reduce and its reduce axes."""
    if axis is None:
        return x, tuple(range(x.ndim))
    axis = axis % x.ndim
    if group_size is None:
        return x, tuple(i for i in range(x.ndim) if i != axis)
    if x.shape[axis] % group_size:
        raise ValueError(f"axis {axis} of size {x.shape[axis]} does not split into groups of {group_size}")
    shape = (*x.shape[:axis], x.shape[axis] // group_size, group_size, *x.shape[axis + 1 :])
    return x.reshape(shape), (axis + 1,)


def minmax(x: np.ndarray, axis: int | None = None, group_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    view, reduce = _grouped(np.asarray(x, np.float64), axis, group_size)
    return view.min(axis=reduce, keepdims=True), view.max(axis=reduce, keepdims=True)


def affine_qparams(min_val, max_val, bits: int, signed: bool = False) -> QParams:
    """Asymmetric: the whole [min, max] (widened to include 0) maps onto all 2**bits levels."""
    qmin, qmax = qrange(bits, signed)
    lo = np.minimum(np.asarray(min_val, np.float64), 0.0)
    hi = np.maximum(np.asarray(max_val, np.float64), 0.0)
    scale = (hi - lo) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0)
    zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return QParams(scale, zero_point.astype(np.int64), qmin, qmax)


def symmetric_qparams(min_val, max_val, bits: int, signed: bool = True) -> QParams:
    """Symmetric around 0: zero point 0 (signed, restricted range [-qmax, qmax]) or the middle
    level (unsigned)."""
    qmin, qmax = qrange(bits, signed)
    absmax = np.maximum(np.abs(np.asarray(min_val, np.float64)), np.abs(np.asarray(max_val, np.float64)))
    half = qmax if signed else (qmax - qmin) // 2
    scale = np.where(absmax > 0, absmax / half, 1.0)
    zero_point = np.zeros_like(scale, dtype=np.int64) if signed else np.full(scale.shape, (qmax + qmin + 1) // 2, np.int64)
    return QParams(scale, zero_point, -qmax if signed else qmin, qmax)


def quantize(x: np.ndarray, params: QParams, axis: int | None = None, group_size: int | None = None) -> np.ndarray:
    view, _ = _grouped(np.asarray(x, np.float64), axis, group_size)
    q = np.clip(np.round(view / params.scale) + params.zero_point, params.qmin, params.qmax)
    return q.reshape(np.shape(x)).astype(np.int64)


def dequantize(q: np.ndarray, params: QParams, axis: int | None = None, group_size: int | None = None) -> np.ndarray:
    view, _ = _grouped(np.asarray(q, np.float64), axis, group_size)
    return ((view - params.zero_point) * params.scale).reshape(np.shape(q))


def fake_quantize(x: np.ndarray, bits: int, *, symmetric: bool = False, signed: bool | None = None,
                  axis: int | None = None, group_size: int | None = None) -> tuple[np.ndarray, QParams]:
    """Quantize and dequantize in one go; returns x' and the parameters used."""
    signed = symmetric if signed is None else signed
    lo, hi = minmax(x, axis, group_size)
    params = (symmetric_qparams if symmetric else affine_qparams)(lo, hi, bits, signed)
    return dequantize(quantize(x, params, axis, group_size), params, axis, group_size), params


def kmeans_codebook(x: np.ndarray, bits: int, iterations: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-uniform: 2**bits centroids fitted to the values (Lloyd's k-means). Started from the
    uniform grid over [min, max]: each Lloyd step only lowers the squared error, so the codebook is
    never worse than uniform quantization with the same number of levels.
    Returns (codebook float32 [2**bits], indices with x's shape)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    values = np.asarray(x, np.float64).reshape(-1)
    levels = 2**bits
    rng = np.random.default_rng(seed)
    sample = values if values.size <= 200_000 else rng.choice(values, 200_000, replace=False)
    codebook = np.linspace(sample.min(), sample.max(), levels)
    for _ in range(iterations):
        edges = (codebook[1:] + codebook[:-1]) / 2
        assignment = np.searchsorted(edges, sample)
        sums = np.bincount(assignment, weights=sample, minlength=levels)
        counts = np.bincount(assignment, minlength=levels)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), codebook)
        updated.sort()
        if np.allclose(updated, codebook):
            break
        codebook = updated
    indices = np.searchsorted((codebook[1:] + codebook[:-1]) / 2, values).reshape(np.shape(x))
    return codebook.astype(np.float32), indices.astype(np.int64)


def pow2_quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """Logarithmic: each value becomes ±2**e with the exponent e in a window of 2**(bits-1) - 1
    steps below the largest magnitude (one bit for the sign, one code for zero)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    values = np.asarray(x, np.float64)
    magnitude = np.abs(values)
    top = np.max(magnitude) if magnitude.size else 0.0
    if top == 0:
        return np.zeros_like(values)
    e_max = np.ceil(np.log2(top))
    e_min = e_max - (2 ** (bits - 1) - 2)
    with np.errstate(divide="ignore"):
        exponent = np.round(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    exponent = np.clip(exponent, e_min, e_max)
    result = np.sign(values) * 2.0**exponent
    # Below half the smallest level a value is closer to zero than to 2**e_min.
    return np.where(magnitude < 2.0 ** (e_min - 1), 0.0, result)
