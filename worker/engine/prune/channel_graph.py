"""Structured channel pruning on an ONNX graph: which channels must go together, and removing them.

Every upload reaches the engine as ONNX, so pruning works there, one implementation for ONNX,
.pt2 and TorchScript models alike. The analysis walks the graph in order and gives every
activation tensor a *channel map*: for each position along its channel axis (axis 1), the group
and index of the channel it carries, or -1 where it carries something that cannot be pruned (the
network input, the output of an operator we do not understand).

- A Conv (group 1), Gemm or MatMul starts a new group: its output channels.
- Element-wise operators and pooling keep the map; BatchNorm, PRelu and per-channel constants are
  sliced by it.
- Add/Mul/... of two mapped tensors ties their groups index by index (residual additions,
  squeeze-excite scaling): they are pruned together.
- Concat along channels concatenates the maps (offsets); Flatten/Reshape to [N, C*H*W] repeats
  each channel H*W times, so the Linear after it loses the right columns.
- A depthwise Conv ties its output to its input and its `group` follows the kept count.
- Anything else that touches a mapped tensor (Transpose, Slice, Shape, Softmax over channels, a
  graph output, a shared weight sliced two ways) *blocks* the groups it touches: they are left
  as they are and listed with the reason. The output never has inconsistent shapes.

What each operator does to channels is one handler per op kind (op_handlers.py); this module walks
the graph with them, then keeps, chooses and cuts channels. Scores come from importance.py.
"""

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from worker.engine.formats import untie_weights
from worker.engine.prune.groups import ChannelGraph, Group, Slice
from worker.engine.prune.op_handlers import OP_HANDLERS, Walk, attributes

__all__ = ["ChannelGraph", "Group", "Slice", "analyse", "apply", "choose", "keep_counts", "kept_outputs", "layer_table"]


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name for t in probe.graph.initializer}
    for value in probe.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in inits and dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    try:
        probe = shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:
        pass
    shapes = {}
    for value in [*probe.graph.input, *probe.graph.value_info, *probe.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def analyse(model: onnx.ModelProto, exclude: list[str] | tuple = ()) -> ChannelGraph:
    """Channel groups of a float ONNX model. The model is copied; `graph.model` is the copy that
    `apply` later prunes (weights de-shared, Identity(weight) made initializers)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    untie_weights(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    walk = Walk(ChannelGraph(model, [], [], {}, []), inits, _shapes(model), set(exclude))
    for node in model.graph.node:
        handler = OP_HANDLERS.get(node.op_type)
        if handler is None or not handler(node, walk):
            walk.not_understood(node)
    graph = walk.graph
    for output in model.graph.output:
        walk.block(walk.maps.get(output.name), f"graph output {output.name} keeps its shape")
    # A weight sliced along one axis by two different maps cannot satisfy both.
    seen: dict[tuple[str, int], np.ndarray] = {}
    for slice_ in graph.slices:
        key = (slice_.initializer, slice_.axis)
        if key in seen and not np.array_equal(seen[key], slice_.channel_map):
            walk.block(seen[key], f"weight {slice_.initializer} is shared")
            walk.block(slice_.channel_map, f"weight {slice_.initializer} is shared")
        seen.setdefault(key, slice_.channel_map)
    return graph


def keep_counts(graph: ChannelGraph, ratio: float, round_to: int) -> dict[int, int]:
    """Channels each prunable group keeps: (1 - ratio) of them, rounded to the nearest multiple of
    `round_to` (never fewer than `round_to`, never more than the group has). Rounding up instead
    made every group halve at once near ratio 0.5, and a MAC target overshot by far."""
    counts = {}
    for root in graph.prunable():
        size = graph.groups[root].size
        want = size * (1.0 - ratio)
        keep = int(round(want / round_to)) * round_to if round_to > 1 else int(round(want))
        counts[root] = int(min(size, max(keep, min(round_to, size), 1)))
    return counts


def choose(scores: dict[int, np.ndarray], counts: dict[int, int]) -> dict[int, np.ndarray]:
    """The indices each group keeps: its highest-scoring channels (ties: the lower index)."""
    kept = {}
    for root, score in scores.items():
        order = np.lexsort((np.arange(len(score)), -score))
        kept[root] = np.sort(order[: counts[root]])
    return kept


def _position_mask(graph: ChannelGraph, channel_map: np.ndarray, kept: dict[int, np.ndarray]) -> np.ndarray:
    mask = np.ones(len(channel_map), dtype=bool)
    for gid in np.unique(channel_map[:, 0]):
        if gid < 0:
            continue
        root = graph.root(int(gid))
        if root not in kept:
            continue
        where = channel_map[:, 0] == gid
        mask[where] = np.isin(channel_map[where, 1], kept[root])
    return mask


def kept_outputs(graph: ChannelGraph, kept: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """For each convolution whose output channels are cut: the indices of those it keeps."""
    out_slices = {(s.initializer, s.axis): s for s in graph.slices if s.role == "out"}
    result = {}
    for node in graph.model.graph.node:
        slice_ = out_slices.get((node.input[1], 0)) if node.op_type == "Conv" and len(node.input) > 1 else None
        if slice_ is not None:
            result[node.name] = np.flatnonzero(_position_mask(graph, slice_.channel_map, kept))
    return result


def apply(graph: ChannelGraph, kept: dict[int, np.ndarray]) -> onnx.ModelProto:
    """A new model with only the kept channels of each group; every weight, BatchNorm, bias,
    depthwise `group` and flattening Reshape follows."""
    model = onnx.ModelProto.FromString(graph.model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    done: set[tuple[str, int]] = set()
    for slice_ in graph.slices:
        key = (slice_.initializer, slice_.axis)
        if key in done:
            continue
        done.add(key)
        mask = _position_mask(graph, slice_.channel_map, kept)
        if not mask.all():
            arrays[slice_.initializer] = np.compress(mask, arrays[slice_.initializer], axis=slice_.axis)
            inits[slice_.initializer].CopyFrom(numpy_helper.from_array(arrays[slice_.initializer], slice_.initializer))
    for node in model.graph.node:
        if node.name in graph.depthwise:
            group = int(_position_mask(graph, graph.depthwise[node.name], kept).sum())
            for attribute in node.attribute:
                if attribute.name == "group":
                    attribute.i = group
    for shape_name, (_, channel_map, spatial) in graph.reshapes.items():
        shape = arrays[shape_name].copy()
        features = int(_position_mask(graph, channel_map, kept).sum()) * spatial
        if shape[1] != -1:
            shape[1] = features
        inits[shape_name].CopyFrom(numpy_helper.from_array(shape, shape_name))
    # Intermediate shapes changed: let ONNX Runtime infer them again.
    del model.graph.value_info[:]
    return model


def layer_table(before: onnx.ModelProto, after: onnx.ModelProto) -> list[dict]:
    """Per compute layer: weight shape, input/output channels and parameter count before and after."""
    def weights(model):
        inits = {t.name: list(t.dims) for t in model.graph.initializer}
        rows = {}
        for node in model.graph.node:
            if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
                rows[node.name] = (node, inits[node.input[1]])
        return rows

    old, new = weights(before), weights(after)
    table = []
    for name, (node, shape) in old.items():
        if name not in new:
            continue
        shape_after = new[name][1]
        out_axis, in_axis = (0, 1) if node.op_type == "Conv" or attributes(node).get("transB", 0) else (1, 0)
        table.append({"layer": name, "op_type": node.op_type,
                      "out_channels": [shape[out_axis], shape_after[out_axis]],
                      "in_channels": [shape[in_axis], shape_after[in_axis]],
                      "parameters": [int(np.prod(shape)), int(np.prod(shape_after))]})
    return table
