"""The channel walk's op handlers, each on a tiny ONNX graph built by hand, and the importance
criteria, each ranking a zeroed channel last. Every graph that may be pruned is also pruned and
run in ONNX Runtime: the result keeps the original's output shape."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.engine.data import ImageSet
from worker.engine.prune import channel_graph, importance
from worker.engine.prune.op_handlers import OP_HANDLERS

RNG = np.random.default_rng(0)
SIDE = 4


class Builder:
    """A graph from input `x` [N, 3, SIDE, SIDE] (N symbolic), node by node."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, out: str, cin: int, cout: int, group: int = 1) -> str:
        w = self.const(f"{out}.w", RNG.standard_normal((cout, cin // group, 1, 1)).astype(np.float32))
        b = self.const(f"{out}.b", RNG.standard_normal(cout).astype(np.float32))
        return self.node("Conv", [x, w, b], out, group=group)

    def batchnorm(self, x: str, out: str, channels: int, gamma=None) -> str:
        gamma = RNG.uniform(0.5, 1.5, channels) if gamma is None else gamma
        params = [self.const(f"{out}.{k}", np.asarray(v, np.float32)) for k, v in
                  (("scale", gamma), ("bias", RNG.standard_normal(channels)), ("mean", RNG.standard_normal(channels) * 0.1),
                   ("var", RNG.uniform(0.5, 1.5, channels)))]
        return self.node("BatchNormalization", [x, *params], out)

    def head(self, x: str, channels: int, classes: int = 5) -> str:
        """GlobalAveragePool -> Flatten -> Gemm: the usual classifier, which keeps the output shape."""
        pooled = self.node("Flatten", [self.node("GlobalAveragePool", [x], "gap")], "flat")
        w = self.const("fc.w", RNG.standard_normal((classes, channels)).astype(np.float32))
        return self.node("Gemm", [pooled, w, self.const("fc.b", np.zeros(classes, np.float32))], "logits", transB=1)

    def model(self, output: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
                                  [helper.make_empty_tensor_value_info(output)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        # The output's shape is left to inference; the checker then wants the inferred one.
        onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True))
        return model


def run(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": images})[0]


def images(count: int = 2) -> np.ndarray:
    return RNG.standard_normal((count, 3, SIDE, SIDE)).astype(np.float32)


def prune_one_each(model: onnx.ModelProto, graph: channel_graph.ChannelGraph) -> onnx.ModelProto:
    """Drop one channel of every prunable group; the result runs and keeps the output shape."""
    counts = {root: graph.groups[root].size - 1 for root in graph.prunable()}
    pruned = channel_graph.apply(graph, channel_graph.choose(importance.by_name("l2").scores(graph), counts))
    sample = images()
    assert run(pruned, sample).shape == run(model, sample).shape
    return pruned


def group_of(graph, layer: str) -> int:
    return graph.root(next(i for i, g in enumerate(graph.groups) if g.layer == layer))


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def blocked_reasons(graph) -> list[str]:
    return list(graph.blocked.values())


# --- one test per op handler ----------------------------------------------------------------

def test_conv_starts_a_group_and_its_consumer_loses_the_same_inputs():
    b = Builder()
    b.head(b.conv(b.node("Relu", [b.conv("x", "c1", 3, 6)], "r1"), "c2", 6, 4), 4)
    model = b.model("logits")
    graph = channel_graph.analyse(model)
    c1, c2 = group_of(graph, "c1"), group_of(graph, "c2")
    assert c1 != c2 and set(graph.prunable()) >= {c1, c2}
    roles = {(s.initializer, s.axis): s.role for s in graph.slices}
    assert roles[("c1.w", 0)] == roles[("c1.b", 0)] == "out" and roles[("c2.w", 1)] == "in"
    pruned = prune_one_each(model, graph)
    assert weight(pruned, "c1.w").shape == (5, 3, 1, 1) and weight(pruned, "c2.w").shape == (3, 5, 1, 1)


def test_depthwise_conv_ties_its_output_to_its_input_and_its_group_follows():
    b = Builder()
    b.head(b.conv(b.conv(b.conv("x", "c1", 3, 6), "dw", 6, 6, group=6), "c2", 6, 4), 4)
    model = b.model("logits")
    graph = channel_graph.analyse(model)
    assert "dw" in graph.depthwise and group_of(graph, "c1") in graph.prunable()
    pruned = prune_one_each(model, graph)
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    assert helper.get_attribute_value(dw.attribute[0]) == 5 and weight(pruned, "dw.w").shape == (5, 1, 1, 1)


def test_grouped_conv_blocks_its_input_group():
    b = Builder()
    b.head(b.conv(b.conv("x", "c1", 3, 6), "g", 6, 4, group=2), 4)
    graph = channel_graph.analyse(b.model("logits"))
    assert group_of(graph, "c1") not in graph.prunable() and "grouped convolution g" in blocked_reasons(graph)


def test_gemm_starts_a_group_matmul_on_a_feature_map_blocks():
    b = Builder()
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [b.conv("x", "c1", 3, 6)], "gap")], "flat")
    hidden = b.node("Gemm", [flat, b.const("fc1.w", RNG.standard_normal((6, 8)).astype(np.float32))], "fc1")
    out = b.node("Gemm", [b.node("Relu", [hidden], "r"), b.const("fc2.w", RNG.standard_normal((8, 5)).astype(np.float32))], "logits")
    model = b.model(out)
    graph = channel_graph.analyse(model)
    assert group_of(graph, "fc1") in graph.prunable() and group_of(graph, "c1") in graph.prunable()
    pruned = prune_one_each(model, graph)
    assert weight(pruned, "fc1.w").shape == (5, 7) and weight(pruned, "fc2.w").shape == (7, 5)

    b = Builder()
    mm = b.node("MatMul", [b.conv("x", "c1", 3, 4), b.const("m.w", RNG.standard_normal((SIDE, SIDE)).astype(np.float32))], "mm")
    graph = channel_graph.analyse(b.model(b.head(mm, 4)))
    assert group_of(graph, "c1") not in graph.prunable() and any("MatMul mm on a tensor of rank 4" in r for r in blocked_reasons(graph))


def test_batchnorm_keeps_the_map_and_its_parameters_are_sliced():
    b = Builder()
    model = b.model(b.head(b.batchnorm(b.conv("x", "c1", 3, 6), "bn", 6), 6))
    graph = channel_graph.analyse(model)
    params = {s.initializer for s in graph.slices if s.role == "param"}
    assert params == {"bn.scale", "bn.bias", "bn.mean", "bn.var"}
    pruned = prune_one_each(model, graph)
    assert all(weight(pruned, name).shape == (5,) for name in params)


def test_unary_ops_and_pooling_pass_the_map_on():
    b = Builder()
    x = b.conv("x", "c1", 3, 6)
    for op in ("Relu", "Sigmoid", "Identity"):
        x = b.node(op, [x], f"{op.lower()}")
    x = b.node("MaxPool", [x], "pool", kernel_shape=[2, 2])
    model = b.model(b.head(b.conv(x, "c2", 6, 4), 4))
    graph = channel_graph.analyse(model)
    assert group_of(graph, "c1") in graph.prunable() and blocked_reasons(graph) == ["graph output logits keeps its shape"]
    prune_one_each(model, graph)


def test_add_ties_residual_groups_and_per_channel_constants_are_sliced():
    b = Builder()
    c1 = b.conv("x", "c1", 3, 6)
    residual = b.node("Add", [b.conv(b.node("Relu", [c1], "r"), "c2", 6, 6), c1], "add")
    scaled = b.node("Mul", [residual, b.const("scale", RNG.standard_normal((1, 6, 1, 1)).astype(np.float32))], "mul")
    model = b.model(b.head(scaled, 6))
    graph = channel_graph.analyse(model)
    assert group_of(graph, "c1") == group_of(graph, "c2") in graph.prunable()
    assert any(s.initializer == "scale" and s.role == "param" for s in graph.slices)
    pruned = prune_one_each(model, graph)
    assert weight(pruned, "scale").shape == (1, 5, 1, 1)


def test_add_with_an_unprunable_operand_blocks_both():
    b = Builder()
    wide = b.node("Add", [b.conv("x", "c1", 3, 6), b.node("Tile", [b.conv("x", "c2", 3, 3), b.const("reps", np.array([1, 2, 1, 1]))], "tile")],
                  "add")
    graph = channel_graph.analyse(b.model(b.head(wide, 6)))
    assert group_of(graph, "c1") not in graph.prunable() and group_of(graph, "c2") not in graph.prunable()


def test_concat_along_channels_concatenates_the_maps_and_other_axes_block():
    b = Builder()
    joined = b.node("Concat", [b.conv("x", "c1", 3, 4), b.conv("x", "c2", 3, 6)], "cat", axis=1)
    model = b.model(b.head(b.conv(joined, "c3", 10, 4), 4))
    graph = channel_graph.analyse(model)
    consumer = next(s for s in graph.slices if s.initializer == "c3.w" and s.role == "in")
    assert len(consumer.channel_map) == 10 and {group_of(graph, "c1"), group_of(graph, "c2")} <= set(graph.prunable())
    pruned = prune_one_each(model, graph)
    assert weight(pruned, "c3.w").shape[1] == 8

    b = Builder()
    joined = b.node("Concat", [b.conv("x", "c1", 3, 4), b.conv("x", "c2", 3, 4)], "cat", axis=2)
    graph = channel_graph.analyse(b.model(b.head(joined, 4)))
    assert not graph.prunable() and "Concat cat along axis 2" in blocked_reasons(graph)


@pytest.mark.parametrize("op", ["Flatten", "Reshape"])
def test_flatten_repeats_each_channel_over_its_positions(op):
    b = Builder()
    c1 = b.conv("x", "c1", 3, 4)
    flat = b.node("Flatten", [c1], "flat") if op == "Flatten" else \
        b.node("Reshape", [c1, b.const("shape", np.array([-1, 4 * SIDE * SIDE]))], "flat")
    model = b.model(b.node("Gemm", [flat, b.const("fc.w", RNG.standard_normal((4 * SIDE * SIDE, 5)).astype(np.float32))], "logits"))
    graph = channel_graph.analyse(model)
    consumer = next(s for s in graph.slices if s.initializer == "fc.w" and s.role == "in")
    assert len(consumer.channel_map) == 4 * SIDE * SIDE and np.array_equal(consumer.channel_map[:SIDE * SIDE, 1], np.zeros(SIDE * SIDE))
    assert ("shape" in graph.reshapes) == (op == "Reshape")
    pruned = prune_one_each(model, graph)
    assert weight(pruned, "fc.w").shape == (3 * SIDE * SIDE, 5)


def test_squeeze_of_spatial_axes_passes_the_map_of_channels_blocks():
    b = Builder()
    pooled = b.node("GlobalAveragePool", [b.conv("x", "c1", 3, 4)], "gap")
    squeezed = b.node("Squeeze", [pooled, b.const("axes", np.array([2, 3]))], "sq")
    model = b.model(b.node("Gemm", [squeezed, b.const("fc.w", RNG.standard_normal((4, 5)).astype(np.float32))], "logits"))
    graph = channel_graph.analyse(model)
    assert group_of(graph, "c1") in graph.prunable()
    prune_one_each(model, graph)

    b = Builder()
    unsqueezed = b.node("Unsqueeze", [b.conv("x", "c1", 3, 4), b.const("axes", np.array([1]))], "unsq")
    b.node("Squeeze", [unsqueezed, b.const("axes2", np.array([1]))], "sq")
    graph = channel_graph.analyse(b.model(b.head("sq", 4)))
    assert group_of(graph, "c1") not in graph.prunable() and "Unsqueeze unsq moves the channel axis" in blocked_reasons(graph)


def test_reduce_over_spatial_axes_passes_the_map_over_channels_blocks():
    b = Builder()
    reduced = b.node("ReduceMean", [b.conv("x", "c1", 3, 4)], "mean", axes=[2, 3], keepdims=1)  # opset 17: an attribute
    model = b.model(b.head(b.conv(reduced, "c2", 4, 4), 4))
    graph = channel_graph.analyse(model)
    assert group_of(graph, "c1") in graph.prunable()
    prune_one_each(model, graph)

    b = Builder()
    b.node("ReduceMean", [b.conv("x", "c1", 3, 4)], "mean", axes=[1], keepdims=1)
    graph = channel_graph.analyse(b.model(b.head(b.conv("mean", "c2", 1, 4), 4)))
    assert group_of(graph, "c1") not in graph.prunable() and "ReduceMean mean reduces over channels" in blocked_reasons(graph)


@pytest.mark.parametrize("axis, prunable", [(3, True), (1, False)])
def test_softmax_over_a_spatial_axis_passes_the_map_over_channels_blocks(axis, prunable):
    b = Builder()
    soft = b.node("Softmax", [b.conv("x", "c1", 3, 4)], "soft", axis=axis)
    model = b.model(b.head(b.conv(soft, "c2", 4, 4), 4))
    graph = channel_graph.analyse(model)
    assert (group_of(graph, "c1") in graph.prunable()) == prunable
    if prunable:
        prune_one_each(model, graph)


@pytest.mark.parametrize("channel_pad, prunable", [(0, True), (1, False)])
def test_pad_of_spatial_axes_passes_the_map_padding_channels_blocks(channel_pad, prunable):
    b = Builder()
    pads = b.const("pads", np.array([0, channel_pad, 1, 1, 0, 0, 1, 1]))
    padded = b.node("Pad", [b.conv("x", "c1", 3, 4), pads], "pad")
    model = b.model(b.head(b.conv(padded, "c2", 4 + channel_pad, 4), 4))
    graph = channel_graph.analyse(model)
    assert (group_of(graph, "c1") in graph.prunable()) == prunable
    if prunable:
        prune_one_each(model, graph)


def test_an_operator_without_handler_blocks_and_so_does_a_graph_output():
    assert "Transpose" not in OP_HANDLERS
    b = Builder()
    b.node("Transpose", [b.conv("x", "c1", 3, 4)], "t", perm=[0, 1, 3, 2])
    graph = channel_graph.analyse(b.model(b.head(b.conv("t", "c2", 4, 4), 4)))
    assert group_of(graph, "c1") not in graph.prunable() and "Transpose t is not understood by the pruner" in blocked_reasons(graph)

    b = Builder()
    graph = channel_graph.analyse(b.model(b.conv("x", "c1", 3, 4)))
    assert not graph.prunable() and "graph output c1 keeps its shape" in blocked_reasons(graph)


def test_every_handled_op_kind_is_covered_here():
    """A new handler needs its own test above: this list is what the tests cover."""
    covered = {"Conv", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization", "Add", "Mul", "Concat", "Flatten",
               "Reshape", "Squeeze", "Unsqueeze", "ReduceMean", "Softmax", "LogSoftmax", "Pad", "Resize", "Upsample"}
    handlers = {OP_HANDLERS[op] for op in covered}
    assert set(OP_HANDLERS.values()) <= handlers | {OP_HANDLERS["Relu"], OP_HANDLERS["Sub"], OP_HANDLERS["ReduceSum"]}


# --- importance criteria ----------------------------------------------------------------------

ZEROED = 2  # the channel of c1 every criterion must rank last


def importance_model(with_batchnorm: bool) -> onnx.ModelProto:
    """x -> c1 (6 channels, channel ZEROED silenced) [-> BatchNorm] -> Relu -> c2 -> head."""
    b = Builder()
    x = b.conv("x", "c1", 3, 6)
    if with_batchnorm:
        gamma = RNG.uniform(0.5, 1.5, 6)
        gamma[ZEROED] = 0.0
        x = b.batchnorm(x, "bn", 6, gamma)
    x = b.conv(b.node("Relu", [x], "r"), "c2", 6, 4)
    model = b.model(b.head(x, 4))
    if not with_batchnorm:  # silence the channel in its producer's rows and its consumer's columns
        for name, axis in (("c1.w", 0), ("c1.b", 0), ("c2.w", 1)):
            tensor = next(t for t in model.graph.initializer if t.name == name)
            array = numpy_helper.to_array(tensor).copy()
            np.moveaxis(array, axis, 0)[ZEROED] = 0
            tensor.CopyFrom(numpy_helper.from_array(array, name))
    return model


@pytest.mark.parametrize("name, with_batchnorm", [("l1", False), ("l2", False), ("bn_scale", True), ("bn_scale", False),
                                                  ("taylor", False)])
def test_each_importance_ranks_a_zeroed_channel_last(name, with_batchnorm, tmp_path):
    model = importance_model(with_batchnorm)
    graph = channel_graph.analyse(model)
    criterion = importance.by_name(name)
    gradients = None
    if criterion.needs_gradients:
        path = tmp_path / "m.onnx"
        onnx.save(graph.model, str(path))
        data = ImageSet(images(32), RNG.integers(0, 5, 32))
        gradients = criterion.gradients(path, data, "cpu")
        assert gradients["c1.w"].shape == (6, 3, 1, 1) and np.abs(gradients["c1.w"]).sum() > 0
    scores = criterion.scores(graph, gradients)[group_of(graph, "c1")]
    assert scores.argmin() == ZEROED and np.sum(scores == scores.min()) == 1
    kept = channel_graph.choose({group_of(graph, "c1"): scores}, {group_of(graph, "c1"): 5})
    assert ZEROED not in kept[group_of(graph, "c1")]


def test_bn_scale_reads_the_batchnorm_not_the_weights():
    """With BatchNorm present, a channel with large weights but gamma 0 still goes first."""
    model = importance_model(with_batchnorm=True)
    weights = next(t for t in model.graph.initializer if t.name == "c1.w")
    array = numpy_helper.to_array(weights).copy()
    array[ZEROED] *= 100
    weights.CopyFrom(numpy_helper.from_array(array, "c1.w"))
    graph = channel_graph.analyse(model)
    root = group_of(graph, "c1")
    assert importance.by_name("bn_scale").scores(graph)[root].argmin() == ZEROED
    assert importance.by_name("l2").scores(graph)[root].argmax() == ZEROED
    assert importance.by_name("taylor").needs_gradients and not importance.by_name("l2").needs_gradients
