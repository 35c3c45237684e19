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
"""

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from worker.engine.formats import untie_weights

UNARY = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Identity", "Dropout", "Exp", "Neg",
         "Sqrt", "Erf", "Cast", "Abs", "Softplus", "Elu", "Selu", "Gelu", "Mish", "Celu", "MaxPool", "AveragePool",
         "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Reciprocal", "Floor", "Ceil", "Round", "Sin", "Cos"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1"}
MAX_MAP = 1 << 22  # positions in one channel map (a Flatten of a large feature map is refused, not expanded)


@dataclass
class Slice:
    """Cut `initializer` along `axis` where `channel_map` positions are pruned."""
    initializer: str
    axis: int
    channel_map: np.ndarray  # int64 [positions, 2]: (group, index) or (-1, -1)
    role: str  # "out": a producer's output channels, "in": a consumer's input channels, "param": per-channel


@dataclass
class Group:
    size: int
    layer: str  # the node that produced the channels
    op_type: str


@dataclass
class ChannelGraph:
    model: onnx.ModelProto
    groups: list[Group]
    parent: list[int]
    blocked: dict[int, str]  # root group -> why it cannot be pruned
    slices: list[Slice]
    depthwise: dict[str, np.ndarray] = field(default_factory=dict)  # node name -> its input map
    reshapes: dict[str, tuple[str, np.ndarray, int]] = field(default_factory=dict)  # shape initializer -> (node, map, spatial)

    def root(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def prunable(self) -> list[int]:
        """Root groups that may lose channels."""
        roots = sorted({self.root(g) for g in range(len(self.groups))})
        return [r for r in roots if r not in self.blocked and self.groups[r].size > 1]

    def members(self, root: int) -> list[int]:
        return [g for g in range(len(self.groups)) if self.root(g) == root]

    def layers(self, root: int) -> list[str]:
        return [self.groups[g].layer for g in self.members(root)]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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
    shapes = _shapes(model)
    graph = ChannelGraph(model, [], [], {}, [])
    maps: dict[str, np.ndarray] = {}
    excluded = set(exclude)

    def new_group(size: int, node) -> np.ndarray:
        gid = len(graph.groups)
        graph.groups.append(Group(size, node.name, node.op_type))
        graph.parent.append(gid)
        if node.name in excluded or node.op_type in excluded:
            graph.blocked[gid] = "excluded"
        return np.stack([np.full(size, gid), np.arange(size)], axis=1)

    def block(channel_map: np.ndarray | None, reason: str) -> None:
        if channel_map is None:
            return
        for gid in np.unique(channel_map[:, 0]):
            if gid >= 0:
                graph.blocked.setdefault(graph.root(int(gid)), reason)

    def unify(a: np.ndarray, b: np.ndarray, reason: str) -> np.ndarray:
        """Positions of a and b carry the same channels from now on."""
        if len(a) != len(b):
            block(a, reason), block(b, reason)
            return a
        free_a, free_b = a[:, 0] < 0, b[:, 0] < 0
        if free_a.any() or free_b.any():  # tied to something unprunable
            block(a, reason), block(b, reason)
            return a
        if not np.array_equal(a[:, 1], b[:, 1]):
            block(a, reason), block(b, reason)
            return a
        for ga, gb in {(int(x), int(y)) for x, y in zip(a[:, 0], b[:, 0])}:
            ra, rb = graph.root(ga), graph.root(gb)
            if ra == rb:
                continue
            if graph.groups[ra].size != graph.groups[rb].size or len({int(x) for x in a[:, 0]}) != 1 or len({int(y) for y in b[:, 0]}) != 1:
                block(a, reason), block(b, reason)
                return a
            graph.parent[rb] = ra
            if rb in graph.blocked:
                graph.blocked.setdefault(ra, graph.blocked.pop(rb))
        return a

    def channels(name: str) -> int | None:
        shape = shapes.get(name)
        return shape[1] if shape and len(shape) >= 2 else None

    for node in model.graph.node:
        op, a = node.op_type, _attrs(node)
        in_maps = [maps.get(name) for name in node.input]
        first = in_maps[0] if in_maps else None
        out = node.output[0] if node.output else None

        if op == "Conv" and node.input[1] in inits:
            weight = inits[node.input[1]]
            groups = a.get("group", 1)
            cin = channels(node.input[0])
            if groups == 1:
                if first is not None:
                    graph.slices.append(Slice(node.input[1], 1, first, "in"))
                maps[out] = new_group(weight.shape[0], node)
                graph.slices.append(Slice(node.input[1], 0, maps[out], "out"))
                if len(node.input) > 2 and node.input[2] in inits:
                    graph.slices.append(Slice(node.input[2], 0, maps[out], "out"))
            elif cin is not None and groups == cin == weight.shape[0] and weight.shape[1] == 1 and first is not None:
                maps[out] = first  # depthwise: output channel c is input channel c
                graph.slices.append(Slice(node.input[1], 0, first, "out"))
                if len(node.input) > 2 and node.input[2] in inits:
                    graph.slices.append(Slice(node.input[2], 0, first, "out"))
                graph.depthwise[node.name] = first
            else:
                block(first, f"grouped convolution {node.name}")
        elif op in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits and inits[node.input[1]].ndim == 2:
            rank = len(shapes.get(node.input[0]) or [])
            trans_b = op == "Gemm" and a.get("transB", 0)
            if (op == "Gemm" and a.get("transA", 0)) or rank != 2:
                block(first, f"{op} {node.name} on a tensor of rank {rank or '?'}")
                continue
            weight = inits[node.input[1]]
            in_axis, out_axis = (1, 0) if trans_b else (0, 1)
            if first is not None:
                graph.slices.append(Slice(node.input[1], in_axis, first, "in"))
            maps[out] = new_group(weight.shape[out_axis], node)
            graph.slices.append(Slice(node.input[1], out_axis, maps[out], "out"))
            if len(node.input) > 2 and node.input[2] in inits:
                bias = inits[node.input[2]]
                if bias.ndim == 1 and bias.shape[0] == weight.shape[out_axis]:
                    graph.slices.append(Slice(node.input[2], 0, maps[out], "out"))
                elif bias.size > 1:
                    block(maps[out], f"bias of {node.name} with shape {list(bias.shape)}")
        elif op == "BatchNormalization" or op == "InstanceNormalization":
            if first is not None:
                for name in node.input[1:]:
                    if name in inits and inits[name].ndim == 1:
                        graph.slices.append(Slice(name, 0, first, "param"))
                maps[out] = first
        elif op in UNARY:
            if first is not None:
                maps[out] = first
        elif op in BINARY:
            rank = len(shapes.get(out) or [])
            carried, constants = None, []
            for name, channel_map in zip(node.input, in_maps):
                shape = inits[name].shape if name in inits else shapes.get(name)
                if shape is None:
                    block(carried, f"{op} {node.name} with an operand of unknown shape")
                    carried = np.full((1, 2), -1)
                    continue
                axis = 1 - (rank - len(shape))
                size = shape[axis] if 0 <= axis < len(shape) else 1
                if size == 1:
                    continue  # broadcast along channels: no tie
                if channel_map is not None:
                    carried = channel_map if carried is None else unify(carried, channel_map, f"{op} {node.name}")
                elif name in inits:
                    constants.append((name, axis))
                else:
                    block(carried, f"{op} {node.name} combines with an unprunable tensor")
                    carried = np.full((size or 1, 2), -1)
            if carried is not None:
                graph.slices.extend(Slice(name, axis, carried, "param") for name, axis in constants)
                maps[out] = carried
        elif op == "Concat":
            axis = a.get("axis", 1)
            rank = len(shapes.get(out) or [])
            if axis % max(rank, 1) == 1 and all(m is not None or channels(n) for m, n in zip(in_maps, node.input)):
                if any(m is not None for m in in_maps):
                    parts = [m if m is not None else np.full((channels(n), 2), -1) for m, n in zip(in_maps, node.input)]
                    maps[out] = np.concatenate(parts)
            else:
                for channel_map in in_maps:
                    block(channel_map, f"Concat {node.name} along axis {axis}")
        elif op in ("Flatten", "Reshape") and first is not None:
            shape = shapes.get(node.input[0])
            target = shapes.get(out)
            spatial = int(np.prod(shape[2:])) if shape and all(d is not None for d in shape[1:]) else None
            flat = target is not None and len(target) == 2 and spatial is not None and target[1] == shape[1] * spatial
            if op == "Flatten":
                flat = flat and a.get("axis", 1) == 1
            else:
                flat = flat and node.input[1] in inits
            if flat and len(first) * spatial <= MAX_MAP:
                maps[out] = np.repeat(first, spatial, axis=0)
                if op == "Reshape":
                    graph.reshapes[node.input[1]] = (node.name, first, spatial)
            else:
                block(first, f"{op} {node.name} changes the channel layout")
        elif op in ("Squeeze", "Unsqueeze") and first is not None:
            axes = a.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1] in inits:
                axes = inits[node.input[1]].tolist()
            rank = len(shapes.get(node.input[0] if op == "Squeeze" else out) or [])
            if axes is not None and rank and all(ax % rank >= 2 for ax in axes):
                maps[out] = first
            else:
                block(first, f"{op} {node.name} moves the channel axis")
        elif op in REDUCE and first is not None:
            axes = a.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1] in inits:
                axes = inits[node.input[1]].tolist()
            rank = len(shapes.get(node.input[0]) or [])
            if axes and rank and all(ax % rank >= 2 for ax in axes):
                maps[out] = first
            else:
                block(first, f"{op} {node.name} reduces over channels")
        elif op in ("Softmax", "LogSoftmax") and first is not None:
            rank = len(shapes.get(out) or [])
            if rank and a.get("axis", -1) % rank >= 2:
                maps[out] = first
            else:
                block(first, f"{op} {node.name} normalises over channels")
        elif op in ("Resize", "Upsample", "Pad") and first is not None:
            rank = len(shapes.get(out) or [])
            pads = inits.get(node.input[1]) if op == "Pad" and len(node.input) > 1 else a.get("pads")
            pads = np.asarray(pads if pads is not None else [0] * 2 * rank).reshape(-1)
            resized_to = op == "Resize" and len(node.input) > 3 and node.input[3]
            channel_padded = op == "Pad" and rank and len(pads) == 2 * rank and (pads[1] or pads[rank + 1])
            if resized_to or channel_padded:
                block(first, f"{op} {node.name} fixes or pads the channel count")
            else:
                maps[out] = first
        else:
            for channel_map in in_maps:
                block(channel_map, f"{op} {node.name} is not understood by the pruner")

    for output in model.graph.output:
        block(maps.get(output.name), f"graph output {output.name} keeps its shape")
    # A weight sliced along one axis by two different maps cannot satisfy both.
    seen: dict[tuple[str, int], np.ndarray] = {}
    for slice_ in graph.slices:
        key = (slice_.initializer, slice_.axis)
        if key in seen and not np.array_equal(seen[key], slice_.channel_map):
            block(seen[key], f"weight {slice_.initializer} is shared"), block(slice_.channel_map, f"weight {slice_.initializer} is shared")
        seen.setdefault(key, slice_.channel_map)
    return graph


def importance(graph: ChannelGraph, criterion: str, gradients: dict[str, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """A score per channel of each prunable root group: the mean over every weight slice that
    carries the channel (producers' rows and consumers' columns), each slice's scores divided by
    their mean first. l1/l2: norms of the weights;
    taylor: |w * dL/dw| summed (first-order estimate of the loss change, needs gradients);
    bn_scale: |gamma| of BatchNorm nodes in the group (l2 where BatchNorm was folded away)."""
    inits = {t.name: t for t in graph.model.graph.initializer}
    roots = graph.prunable()
    scores = {r: np.zeros(graph.groups[r].size) for r in roots}
    counts = {r: np.zeros(graph.groups[r].size) for r in roots}
    bn_gammas = set()
    if criterion == "bn_scale":
        bn_gammas = {n.input[1] for n in graph.model.graph.node if n.op_type == "BatchNormalization"}
    arrays: dict[str, np.ndarray] = {}
    for slice_ in graph.slices:
        if criterion == "bn_scale" and slice_.initializer not in bn_gammas:
            continue
        if criterion != "bn_scale" and slice_.role == "param":
            continue  # BatchNorm statistics, per-channel constants: not weights
        array = arrays.get(slice_.initializer)
        if array is None:
            array = arrays[slice_.initializer] = numpy_helper.to_array(inits[slice_.initializer]).astype(np.float64)
        moved = np.moveaxis(array, slice_.axis, 0).reshape(array.shape[slice_.axis], -1)
        if criterion == "taylor":
            grad = (gradients or {}).get(slice_.initializer)
            if grad is None:
                continue
            grad = np.moveaxis(grad.astype(np.float64), slice_.axis, 0).reshape(moved.shape)
            per_position = np.abs(moved * grad).sum(axis=1)
        elif criterion in ("l1", "bn_scale"):
            per_position = np.abs(moved).sum(axis=1)
        else:
            per_position = np.sqrt((moved**2).sum(axis=1))
        # Each weight counts alike, whatever its scale (a wide Linear's columns would outweigh a conv's rows).
        per_position = per_position / max(float(per_position.mean()), 1e-12)
        cmap = slice_.channel_map
        for gid in np.unique(cmap[:, 0]):
            if gid < 0 or graph.root(int(gid)) not in scores:
                continue
            root = graph.root(int(gid))
            where = cmap[:, 0] == gid
            np.add.at(scores[root], cmap[where, 1], per_position[where])
            np.add.at(counts[root], cmap[where, 1], 1)
    if criterion == "bn_scale":  # groups without a BatchNorm fall back to l2
        missing = [r for r in roots if not counts[r].any()]
        if missing:
            fallback = importance(graph, "l2")
            for r in missing:
                scores[r], counts[r] = fallback[r], np.ones_like(fallback[r])
    return {r: scores[r] / np.maximum(counts[r], 1) for r in roots}


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
        out_axis, in_axis = (0, 1) if node.op_type == "Conv" or _attrs(node).get("transB", 0) else (1, 0)
        table.append({"layer": name, "op_type": node.op_type,
                      "out_channels": [shape[out_axis], shape_after[out_axis]],
                      "in_channels": [shape[in_axis], shape_after[in_axis]],
                      "parameters": [int(np.prod(shape)), int(np.prod(shape_after))]})
    return table
