"""Property tests of the quantization arithmetic (hypothesis)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from worker.engine.quantize import qmath

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
tensors = arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4)), elements=finite)
bits = st.integers(2, 8)


@settings(max_examples=200, deadline=None)
@given(x=tensors, bits=bits, symmetric=st.booleans(), signed=st.booleans(), axis=st.sampled_from([None, 0, 1, 2, -1]))
def test_zero_is_exact_and_error_is_at_most_half_a_step(x, bits, symmetric, signed, axis):
    lo, hi = qmath.minmax(x, axis)
    params = (qmath.symmetric_qparams if symmetric else qmath.affine_qparams)(lo, hi, bits, signed)
    zero = np.zeros_like(x)
    assert np.all(qmath.dequantize(qmath.quantize(zero, params, axis), params, axis) == 0.0)
    roundtrip = qmath.dequantize(qmath.quantize(x, params, axis), params, axis)
    assert np.all(np.abs(roundtrip - x) <= params.scale / 2 * (1 + 1e-9) + 1e-9)
    q = qmath.quantize(x, params, axis)
    assert q.min() >= params.qmin and q.max() <= params.qmax


@settings(max_examples=100, deadline=None)
@given(x=tensors, bits=bits, signed=st.booleans())
def test_values_outside_the_range_clip_to_its_ends(x, bits, signed):
    lo, hi = qmath.minmax(x)
    params = qmath.affine_qparams(lo, hi, bits, signed)
    far = np.array([float(lo.min()) - 1e4, float(hi.max()) + 1e4])
    assert qmath.quantize(far, params).tolist() == [params.qmin, params.qmax]


@settings(max_examples=100, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([4, 8, 12])), elements=finite), bits=bits)
def test_per_group_uses_each_groups_own_range(x, bits):
    dq, params = qmath.fake_quantize(x, bits, axis=1, group_size=4)
    assert params.scale.shape == (x.shape[0], x.shape[1] // 4, 1)
    groups = x.reshape(x.shape[0], -1, 4)
    assert np.all(np.abs(dq.reshape(groups.shape) - groups) <= params.scale / 2 + 1e-6)


def test_per_channel_any_axis_keeps_small_channels_precise():
    x = np.stack([np.linspace(-1e-3, 1e-3, 50), np.linspace(-100, 100, 50)], axis=1)  # channel on axis 1
    per_tensor, _ = qmath.fake_quantize(x, 8, symmetric=True)
    per_channel, params = qmath.fake_quantize(x, 8, symmetric=True, axis=1)
    assert params.scale.shape == (1, 2)
    assert np.abs(per_channel[:, 0] - x[:, 0]).max() < 1e-5
    assert np.all(per_tensor[:, 0] == 0)  # one scale for both: the small channel vanishes


def test_the_widely_copied_snippet_loses_half_the_levels():
    """scale = (max-min)/(2**(b-1)-1), offset = min, clip to the signed range: (x - min)/scale is
    never negative, so the negative half of the signed range is never used."""
    bits = 8
    x = np.linspace(-3.0, 5.0, 10_000)
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / (2 ** (bits - 1) - 1)
    snippet_q = np.clip(np.round((x - lo) / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    snippet = snippet_q * scale + lo
    ours, params = qmath.fake_quantize(x, bits, signed=True)
    assert len(np.unique(snippet_q)) == 2 ** (bits - 1)
    assert len(np.unique(qmath.quantize(x, params))) == 2**bits
    assert np.abs(ours - x).max() < 0.6 * np.abs(snippet - x).max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kmeans_codebook_beats_uniform_on_bell_shaped_weights(bits):
    weights = np.random.default_rng(0).normal(0, 0.05, size=20_000)
    codebook, indices = qmath.kmeans_codebook(weights, bits)
    assert codebook.shape == (2**bits,) and indices.max() < 2**bits
    kmeans_error = np.mean((codebook[indices] - weights) ** 2)
    uniform, _ = qmath.fake_quantize(weights, bits)
    assert kmeans_error < np.mean((uniform - weights) ** 2)


@settings(max_examples=100, deadline=None)
@given(x=tensors, bits=bits)
def test_power_of_two_values_are_signed_powers_of_two(x, bits):
    result = qmath.pow2_quantize(x, bits)
    nonzero = result[result != 0]
    exponents = np.log2(np.abs(nonzero))
    assert np.allclose(exponents, np.round(exponents))
    assert np.all(np.sign(nonzero) == np.sign(x[result != 0]))
    assert len(np.unique(np.round(exponents))) <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bad", [1, 9])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError):
        qmath.qrange(bad, True)
