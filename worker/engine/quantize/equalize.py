"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019; AIMET and NNCF do the
same): in a chain conv A -> [Relu] -> conv B, output channel i of A and input channel i of B can be
rescaled against each other, A's by 1/s and B's by s, without changing what the float model
computes (ReLU(x/s) = ReLU(x)/s for s > 0). With s = sqrt(r_A / r_B), r the channel's largest weight
magnitude, both channels end with the same range. This matters for per-tensor weight scales, where
one wide channel (typical of depthwise convolutions after BatchNorm folding) crushes the narrow ones
to a few int8 levels; with per-channel scales it changes little.

Works on the ONNX graph as ONNX Runtime's pre-processing leaves it (BatchNorm folded into Conv).
Only Relu may sit between the two convolutions: Clip (ReLU6), hard-swish and the like are not
scale-equivariant, and such pairs are left alone."""

import numpy as np
import onnx
from onnx import numpy_helper

ROUNDS = 4  # each round equalizes every pair once; chains converge in a few
_EPS = 1e-12


def equalize(model: onnx.ModelProto, rounds: int = ROUNDS) -> dict:
    """Equalize every eligible conv pair of `model` in place; the report names the pairs and the
    mean ratio of the largest to the smallest channel range in the pairs' weights, before and after."""
    weights = {t.name: t for t in model.graph.initializer}
    pairs = _pairs(model, weights)
    if not pairs:
        return {"pairs": 0}
    before = _spread(pairs, weights)
    for _ in range(rounds):
        for first, second in pairs:
            _equalize_pair(first, second, weights)
    return {"pairs": len(pairs), "names": [[a.name, b.name] for a, b in pairs][:50],
            "range_spread_before": before, "range_spread_after": _spread(pairs, weights)}


def _pairs(model: onnx.ModelProto, weights: dict) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}

    def only_consumer(tensor: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in graph_outputs else None

    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def plain_conv(node: onnx.NodeProto) -> bool:
        # Weights in initializers (not computed), each used by this node alone: a shared weight
        # cannot be rescaled for one of its users.
        params = [name for name in node.input[1:3] if name]
        return node.op_type == "Conv" and len(node.input) >= 2 and all(name in weights and uses[name] == 1 for name in params)

    pairs = []
    for first in model.graph.node:
        if not plain_conv(first):
            continue
        after = only_consumer(first.output[0])
        if after is not None and after.op_type == "Relu":
            after = only_consumer(after.output[0])
        if after is None or not plain_conv(after) or after.input[0] == first.input[0]:
            continue
        out_channels = numpy_helper.to_array(weights[first.input[1]]).shape[0]
        second_weight = numpy_helper.to_array(weights[after.input[1]])
        group = _group(after)
        depthwise = group == out_channels and second_weight.shape[1] == 1
        if group == 1 and second_weight.shape[1] == out_channels or depthwise:
            pairs.append((first, after))
    return pairs


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _ranges(first_w: np.ndarray, second_w: np.ndarray, depthwise: bool) -> tuple[np.ndarray, np.ndarray]:
    r_first = np.abs(first_w).reshape(first_w.shape[0], -1).max(axis=1)
    r_second = np.abs(second_w).reshape(second_w.shape[0], -1).max(axis=1) if depthwise else \
        np.abs(second_w).transpose(1, 0, *range(2, second_w.ndim)).reshape(second_w.shape[1], -1).max(axis=1)
    return r_first, r_second


def _equalize_pair(first: onnx.NodeProto, second: onnx.NodeProto, weights: dict) -> None:
    first_w = numpy_helper.to_array(weights[first.input[1]]).astype(np.float64)
    second_w = numpy_helper.to_array(weights[second.input[1]]).astype(np.float64)
    depthwise = _group(second) > 1
    r_first, r_second = _ranges(first_w, second_w, depthwise)
    alive = (r_first > _EPS) & (r_second > _EPS)  # a dead channel keeps its scale
    scale = np.where(alive, np.sqrt(np.maximum(r_first, _EPS) / np.maximum(r_second, _EPS)), 1.0)
    shape = (-1,) + (1,) * (first_w.ndim - 1)
    _store(weights[first.input[1]], first_w / scale.reshape(shape))
    if len(first.input) >= 3 and first.input[2]:
        _store(weights[first.input[2]], numpy_helper.to_array(weights[first.input[2]]) / scale)
    if depthwise:
        _store(weights[second.input[1]], second_w * scale.reshape(shape))
    else:
        _store(weights[second.input[1]], second_w * scale.reshape((1, -1) + (1,) * (second_w.ndim - 2)))


def _store(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    dtype = numpy_helper.to_array(tensor).dtype
    tensor.CopyFrom(numpy_helper.from_array(values.astype(dtype), tensor.name))


def _spread(pairs, weights) -> float:
    """Mean over pairs of (largest / smallest) channel range of the first conv's output channels:
    what a per-tensor scale has to cover."""
    spreads = []
    for first, _ in pairs:
        w = numpy_helper.to_array(weights[first.input[1]])
        ranges = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        ranges = ranges[ranges > _EPS]
        if len(ranges):
            spreads.append(float(ranges.max() / ranges.min()))
    return round(float(np.mean(spreads)), 3) if spreads else 1.0
