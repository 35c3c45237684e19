"""How each ONNX operator moves channels: one small handler per op kind, in a table.

`channel_graph.analyse` walks the graph in order and hands every node to the handler of its
`op_type` with the walk's state (`Walk`): the channel map of every tensor seen so far, the
groups, and the weight slices. A handler gives the node's output its channel map, records the
slices of its weights, ties groups that must be pruned together (`unify`) or blocks those it
cannot follow (`block`). It returns False when this node is one its op kind does not cover (a
Conv whose weight is computed, a Reshape of an unmapped tensor): the node is then treated as an
operator the pruner does not understand, which blocks every group it touches. An op kind with
no handler is treated the same way. `register_op` adds a handler (a plugin's operator).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from worker.engine.prune.groups import ChannelGraph, Group, Slice

UNARY = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Identity", "Dropout", "Exp", "Neg",
         "Sqrt", "Erf", "Cast", "Abs", "Softplus", "Elu", "Selu", "Gelu", "Mish", "Celu", "MaxPool", "AveragePool",
         "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Reciprocal", "Floor", "Ceil", "Round", "Sin", "Cos"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1"}
MAX_MAP = 1 << 22  # positions in one channel map (a Flatten of a large feature map is refused, not expanded)


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class Walk:
    """The analysis in progress: what handlers read and change."""

    graph: ChannelGraph
    inits: dict[str, np.ndarray]  # initializers by name
    shapes: dict[str, list[int | None]]  # inferred shapes by tensor name
    excluded: set[str]
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # tensor name -> channel map

    def in_maps(self, node: onnx.NodeProto) -> list[np.ndarray | None]:
        return [self.maps.get(name) for name in node.input]

    def first(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The channel map of the node's first input (None: it carries no prunable channels)."""
        return self.maps.get(node.input[0]) if node.input else None

    def rank(self, name: str) -> int:
        return len(self.shapes.get(name) or [])

    def channels(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return shape[1] if shape and len(shape) >= 2 else None

    def constant_axes(self, node: onnx.NodeProto) -> list[int] | None:
        """`axes` from the attribute (older opsets) or the constant second input."""
        axes = attributes(node).get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in self.inits:
            axes = self.inits[node.input[1]].tolist()
        return axes

    def new_group(self, size: int, node: onnx.NodeProto) -> np.ndarray:
        gid = len(self.graph.groups)
        self.graph.groups.append(Group(size, node.name, node.op_type))
        self.graph.parent.append(gid)
        if node.name in self.excluded or node.op_type in self.excluded:
            self.graph.blocked[gid] = "excluded"
        return np.stack([np.full(size, gid), np.arange(size)], axis=1)

    def block(self, channel_map: np.ndarray | None, reason: str) -> None:
        if channel_map is None:
            return
        for gid in np.unique(channel_map[:, 0]):
            if gid >= 0:
                self.graph.blocked.setdefault(self.graph.root(int(gid)), reason)

    def unify(self, a: np.ndarray, b: np.ndarray, reason: str) -> np.ndarray:
        """Positions of a and b carry the same channels from now on (or both are blocked)."""
        graph = self.graph
        consistent = len(a) == len(b) and not (a[:, 0] < 0).any() and not (b[:, 0] < 0).any() \
            and np.array_equal(a[:, 1], b[:, 1])
        if not consistent:  # other sizes, tied to something unprunable, or other orders
            self.block(a, reason), self.block(b, reason)
            return a
        for ga, gb in {(int(x), int(y)) for x, y in zip(a[:, 0], b[:, 0])}:
            ra, rb = graph.root(ga), graph.root(gb)
            if ra == rb:
                continue
            if graph.groups[ra].size != graph.groups[rb].size or len({int(x) for x in a[:, 0]}) != 1 or len({int(y) for y in b[:, 0]}) != 1:
                self.block(a, reason), self.block(b, reason)
                return a
            graph.parent[rb] = ra
            if rb in graph.blocked:
                graph.blocked.setdefault(ra, graph.blocked.pop(rb))
        return a

    def not_understood(self, node: onnx.NodeProto) -> None:
        for channel_map in self.in_maps(node):
            self.block(channel_map, f"{node.op_type} {node.name} is not understood by the pruner")

    def slice_bias(self, node: onnx.NodeProto, channel_map: np.ndarray) -> None:
        if len(node.input) > 2 and node.input[2] in self.inits:
            self.graph.slices.append(Slice(node.input[2], 0, channel_map, "out"))


OpHandler = Callable[[onnx.NodeProto, Walk], bool]
OP_HANDLERS: dict[str, OpHandler] = {}


def register_op(*op_types: str) -> Callable[[OpHandler], OpHandler]:
    def decorate(handler: OpHandler) -> OpHandler:
        for op_type in op_types:
            OP_HANDLERS[op_type] = handler
        return handler

    return decorate


@register_op("Conv")
def conv(node, walk: Walk) -> bool:
    """group 1 starts a group (its output channels); depthwise ties output c to input c."""
    if node.input[1] not in walk.inits:
        return False
    weight, first, out = walk.inits[node.input[1]], walk.first(node), node.output[0]
    groups, cin = attributes(node).get("group", 1), walk.channels(node.input[0])
    if groups == 1:
        if first is not None:
            walk.graph.slices.append(Slice(node.input[1], 1, first, "in"))
        walk.maps[out] = walk.new_group(weight.shape[0], node)
        walk.graph.slices.append(Slice(node.input[1], 0, walk.maps[out], "out"))
        walk.slice_bias(node, walk.maps[out])
    elif cin is not None and groups == cin == weight.shape[0] and weight.shape[1] == 1 and first is not None:
        walk.maps[out] = first
        walk.graph.slices.append(Slice(node.input[1], 0, first, "out"))
        walk.slice_bias(node, first)
        walk.graph.depthwise[node.name] = first  # its `group` follows the kept count
    else:
        walk.block(first, f"grouped convolution {node.name}")
    return True


@register_op("Gemm", "MatMul")
def linear(node, walk: Walk) -> bool:
    """A constant 2-D weight on a 2-D input starts a group (its output features)."""
    if len(node.input) < 2 or node.input[1] not in walk.inits or walk.inits[node.input[1]].ndim != 2:
        return False
    op, a, first, out = node.op_type, attributes(node), walk.first(node), node.output[0]
    rank = walk.rank(node.input[0])
    if (op == "Gemm" and a.get("transA", 0)) or rank != 2:
        walk.block(first, f"{op} {node.name} on a tensor of rank {rank or '?'}")
        return True
    weight = walk.inits[node.input[1]]
    in_axis, out_axis = (1, 0) if op == "Gemm" and a.get("transB", 0) else (0, 1)
    if first is not None:
        walk.graph.slices.append(Slice(node.input[1], in_axis, first, "in"))
    walk.maps[out] = walk.new_group(weight.shape[out_axis], node)
    walk.graph.slices.append(Slice(node.input[1], out_axis, walk.maps[out], "out"))
    if len(node.input) > 2 and node.input[2] in walk.inits:
        bias = walk.inits[node.input[2]]
        if bias.ndim == 1 and bias.shape[0] == weight.shape[out_axis]:
            walk.graph.slices.append(Slice(node.input[2], 0, walk.maps[out], "out"))
        elif bias.size > 1:
            walk.block(walk.maps[out], f"bias of {node.name} with shape {list(bias.shape)}")
    return True


@register_op("BatchNormalization", "InstanceNormalization")
def normalization(node, walk: Walk) -> bool:
    """Keeps the map; its per-channel parameters are sliced by it."""
    first = walk.first(node)
    if first is not None:
        for name in node.input[1:]:
            if name in walk.inits and walk.inits[name].ndim == 1:
                walk.graph.slices.append(Slice(name, 0, first, "param"))
        walk.maps[node.output[0]] = first
    return True


@register_op(*UNARY)
def elementwise_unary(node, walk: Walk) -> bool:
    """Activations and pooling keep the map."""
    first = walk.first(node)
    if first is not None:
        walk.maps[node.output[0]] = first
    return True


@register_op(*BINARY)
def elementwise_binary(node, walk: Walk) -> bool:
    """Ties the groups of mapped operands index by index (residual adds, squeeze-excite scaling);
    per-channel constants are sliced; operands broadcast along channels tie nothing."""
    op, out = node.op_type, node.output[0]
    rank = walk.rank(out)
    carried, constants = None, []
    for name, channel_map in zip(node.input, walk.in_maps(node)):
        shape = walk.inits[name].shape if name in walk.inits else walk.shapes.get(name)
        if shape is None:
            walk.block(carried, f"{op} {node.name} with an operand of unknown shape")
            carried = np.full((1, 2), -1)
            continue
        axis = 1 - (rank - len(shape))
        size = shape[axis] if 0 <= axis < len(shape) else 1
        if size == 1:
            continue
        if channel_map is not None:
            carried = channel_map if carried is None else walk.unify(carried, channel_map, f"{op} {node.name}")
        elif name in walk.inits:
            constants.append((name, axis))
        else:
            walk.block(carried, f"{op} {node.name} combines with an unprunable tensor")
            carried = np.full((size or 1, 2), -1)
    if carried is not None:
        walk.graph.slices.extend(Slice(name, axis, carried, "param") for name, axis in constants)
        walk.maps[out] = carried
    return True


@register_op("Concat")
def concat(node, walk: Walk) -> bool:
    """Along channels: the maps one after the other (unmapped inputs as unprunable positions)."""
    axis, out, in_maps = attributes(node).get("axis", 1), node.output[0], walk.in_maps(node)
    if axis % max(walk.rank(out), 1) == 1 and all(m is not None or walk.channels(n) for m, n in zip(in_maps, node.input)):
        if any(m is not None for m in in_maps):
            parts = [m if m is not None else np.full((walk.channels(n), 2), -1) for m, n in zip(in_maps, node.input)]
            walk.maps[out] = np.concatenate(parts)
    else:
        for channel_map in in_maps:
            walk.block(channel_map, f"Concat {node.name} along axis {axis}")
    return True


@register_op("Flatten", "Reshape")
def flatten(node, walk: Walk) -> bool:
    """To [N, C*H*W]: each channel repeated H*W times (the Linear after it loses those columns);
    a constant Reshape shape is rewritten by `apply`."""
    first, op, out = walk.first(node), node.op_type, node.output[0]
    if first is None:
        return False
    shape, target = walk.shapes.get(node.input[0]), walk.shapes.get(out)
    spatial = int(np.prod(shape[2:])) if shape and all(d is not None for d in shape[1:]) else None
    flat = target is not None and len(target) == 2 and spatial is not None and target[1] == shape[1] * spatial
    flat = flat and (attributes(node).get("axis", 1) == 1 if op == "Flatten" else node.input[1] in walk.inits)
    if flat and len(first) * spatial <= MAX_MAP:
        walk.maps[out] = np.repeat(first, spatial, axis=0)
        if op == "Reshape":
            walk.graph.reshapes[node.input[1]] = (node.name, first, spatial)
    else:
        walk.block(first, f"{op} {node.name} changes the channel layout")
    return True


@register_op("Squeeze", "Unsqueeze")
def squeeze(node, walk: Walk) -> bool:
    """Keeps the map when only spatial axes come or go."""
    first = walk.first(node)
    if first is None:
        return False
    axes = walk.constant_axes(node)
    rank = walk.rank(node.input[0] if node.op_type == "Squeeze" else node.output[0])
    if axes is not None and rank and all(ax % rank >= 2 for ax in axes):
        walk.maps[node.output[0]] = first
    else:
        walk.block(first, f"{node.op_type} {node.name} moves the channel axis")
    return True


@register_op(*REDUCE)
def reduce(node, walk: Walk) -> bool:
    """Keeps the map when it reduces spatial axes only."""
    first = walk.first(node)
    if first is None:
        return False
    axes, rank = walk.constant_axes(node), walk.rank(node.input[0])
    if axes and rank and all(ax % rank >= 2 for ax in axes):
        walk.maps[node.output[0]] = first
    else:
        walk.block(first, f"{node.op_type} {node.name} reduces over channels")
    return True


@register_op("Softmax", "LogSoftmax")
def softmax(node, walk: Walk) -> bool:
    """Keeps the map when it normalises over a spatial axis."""
    first = walk.first(node)
    if first is None:
        return False
    rank = walk.rank(node.output[0])
    if rank and attributes(node).get("axis", -1) % rank >= 2:
        walk.maps[node.output[0]] = first
    else:
        walk.block(first, f"{node.op_type} {node.name} normalises over channels")
    return True


@register_op("Resize", "Upsample", "Pad")
def resize_or_pad(node, walk: Walk) -> bool:
    """Keeps the map unless it resizes to a fixed size or pads the channel axis."""
    first, op = walk.first(node), node.op_type
    if first is None:
        return False
    rank = walk.rank(node.output[0])
    pads = walk.inits.get(node.input[1]) if op == "Pad" and len(node.input) > 1 else attributes(node).get("pads")
    pads = np.asarray(pads if pads is not None else [0] * 2 * rank).reshape(-1)
    resized_to = op == "Resize" and len(node.input) > 3 and node.input[3]
    channel_padded = op == "Pad" and rank and len(pads) == 2 * rank and (pads[1] or pads[rank + 1])
    if resized_to or channel_padded:
        walk.block(first, f"{op} {node.name} fixes or pads the channel count")
    else:
        walk.maps[node.output[0]] = first
    return True
