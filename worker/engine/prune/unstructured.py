"""Unstructured (magnitude) and semi-structured (n_m) pruning: weights zeroed in place.

- magnitude zeroes the smallest |w| of each Conv/Gemm/MatMul weight (per layer, or one threshold
  for all).
- n_m keeps the n largest |w| of every m consecutive weights along the input dimension and checks
  every group afterwards. Layers whose input dimension is not a multiple of m are left and listed.

Both return the masks of kept weights (recovery training keeps the zeros) and the step's details.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.spec.configs import PruneStepConfig
from modelpress.spec.errors import EngineError

PRUNABLE_OPS = {"Conv", "Gemm", "MatMul"}


def _weights(model: onnx.ModelProto, config: PruneStepConfig, left: list) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """The weights unstructured pruning works on. Depthwise/grouped convolutions (a handful of
    weights per channel) and layers under `min_weights` (the stem, squeeze-excite) hold little of
    the size and much of the accuracy: they are left, and listed."""
    inits = {t.name: t for t in model.graph.initializer}
    chosen = []
    for node in model.graph.node:
        if node.op_type not in PRUNABLE_OPS or node.name in config.exclude or node.op_type in config.exclude:
            continue
        tensor = inits.get(node.input[1]) if len(node.input) > 1 else None
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        size = int(np.prod(tensor.dims))
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute):
            left.append({"layer": node.name, "reason": "grouped or depthwise convolution"})
        elif size < config.min_weights:
            left.append({"layer": node.name, "reason": f"{size} weights, under min_weights={config.min_weights}"})
        else:
            chosen.append((node, tensor))
    return chosen


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """A mask of the `count` smallest values (exactly that many; ties go to the lower index)."""
    mask = np.zeros(values.size, dtype=bool)
    if count > 0:
        mask[np.argsort(values.reshape(-1), kind="stable")[:count]] = True
    return mask.reshape(values.shape)


def prune_magnitude(config: PruneStepConfig, source: Path, output: Path, sparsity: float):
    model = onnx.load(str(source))
    left = []
    layers = _weights(model, config, left)
    arrays = [numpy_helper.to_array(t) for _, t in layers]
    if config.scope == "global":
        everything = np.concatenate([np.abs(a).reshape(-1) for a in arrays]) if arrays else np.zeros(0)
        pruned_all = _smallest(everything, int(sparsity * everything.size))
        offsets = np.cumsum([0] + [a.size for a in arrays])
        zeroed = [pruned_all[offsets[i] : offsets[i + 1]].reshape(a.shape) for i, a in enumerate(arrays)]
    else:
        zeroed = [_smallest(np.abs(a), int(sparsity * a.size)) for a in arrays]
    masks, table = {}, []
    for (node, tensor), array, zero in zip(layers, arrays, zeroed):
        pruned = np.where(zero, np.float32(0), array).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(pruned, tensor.name))
        masks[tensor.name] = ~zero
        table.append({"layer": node.name, "op_type": node.op_type, "weights": int(array.size),
                      "nonzero": [int(np.count_nonzero(array)), int(np.count_nonzero(pruned))],
                      "sparsity": round(1 - np.count_nonzero(pruned) / array.size, 6)})
    onnx.save(model, str(output))
    return masks, {"scope": config.scope, "target_sparsity": round(sparsity, 6), "layers": table, "left": left}


def _input_last(node: onnx.NodeProto, array: np.ndarray) -> tuple[np.ndarray, callable]:
    """The weight with its input dimension last (groups of m run along it), and the inverse."""
    if node.op_type == "Conv":  # [O, I, kh, kw] -> [O, kh, kw, I]
        return np.moveaxis(array, 1, -1), lambda x: np.moveaxis(x, -1, 1)
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    if node.op_type == "Gemm" and trans_b:  # [out, in]
        return array, lambda x: x
    return array.T, lambda x: x.T  # MatMul / Gemm: [in, out]


def prune_n_m(config: PruneStepConfig, source: Path, output: Path):
    model = onnx.load(str(source))
    masks, table, left = {}, [], []
    for node, tensor in _weights(model, config, left):
        array = numpy_helper.to_array(tensor)
        moved, back = _input_last(node, array)
        if moved.shape[-1] % config.m:
            left.append({"layer": node.name, "reason": f"input dimension {moved.shape[-1]} is not a multiple of {config.m}"})
            continue
        groups = np.abs(moved).reshape(-1, config.m)
        # Within each group, drop the m - n smallest (stable order: ties go to the lower index).
        order = np.argsort(groups, axis=1, kind="stable")
        keep = np.ones_like(groups, dtype=bool)
        np.put_along_axis(keep, order[:, : config.m - config.n], False, axis=1)
        mask = back(keep.reshape(moved.shape))
        pruned = np.where(mask, array, np.float32(0)).astype(np.float32)
        verified = _groups_ok(_input_last(node, pruned)[0], config.n, config.m)
        tensor.CopyFrom(numpy_helper.from_array(pruned, tensor.name))
        masks[tensor.name] = mask
        table.append({"layer": node.name, "op_type": node.op_type, "weights": int(array.size),
                      "nonzero": [int(np.count_nonzero(array)), int(np.count_nonzero(pruned))],
                      "sparsity": round(1 - np.count_nonzero(pruned) / array.size, 6), "n_m_verified": verified})
    if not table:
        raise EngineError("nothing_to_prune", f"no layer has an input dimension that is a multiple of m={config.m}")
    onnx.save(model, str(output))
    return masks, {"n": config.n, "m": config.m, "layers": table, "left": left}


def _groups_ok(input_last: np.ndarray, n: int, m: int) -> bool:
    """Every group of m consecutive weights along the input dimension has at most n non-zeros."""
    return bool((np.count_nonzero(input_last.reshape(-1, m), axis=1) <= n).all())
