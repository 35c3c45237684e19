"""The prune step: the weights and channels removed are the least important by the chosen
criterion (not the first ones), dependencies are respected (the pruned model computes exactly what
the original computes once the removed channels are zero), and the API path works on ONNX and
PyTorch uploads with clear 422s for bad parameters."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zstandard
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.test_models_api import assert_problem
from worker.engine.prune import channel_graph, importance
from modelpress.spec.configs import parse_step
from worker.engine.data import ImageSet
from modelpress.spec.errors import EngineError
from worker.engine.registry import StepContext, handler_for


class Zoo(nn.Module):
    """Every dependency the pruner must follow: a residual addition, a depthwise convolution,
    squeeze-excite, a concatenation, a Reshape with the feature count written into it, and a
    second, detection-style output next to the classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.se1, self.se2 = nn.Conv2d(24, 8, 1), nn.Conv2d(8, 24, 1)
        self.b1, self.b2 = nn.Conv2d(24, 8, 3, padding=1), nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(24 * 4 * 4, 10)
        self.det = nn.Conv2d(24, 6, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.bn_a(self.a(x)))
        y = F.relu(self.pw(F.relu6(self.dw(x))))
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        z = F.max_pool2d(torch.cat([F.relu(self.b1(y)), F.relu(self.b2(y))], 1), 2)
        return self.head(z.reshape(-1, 24 * 4 * 4)), self.det(z)


def export(module, path, shape=(2, 1, 8, 8)):
    torch.manual_seed(0)
    for parameter in module.parameters():
        nn.init.normal_(parameter, std=0.3)
    module.eval()
    torch.onnx.export(module, (torch.rand(shape),), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    return path


def bn_graph(path):
    """Conv -> BatchNormalization -> Relu -> Conv -> BN -> Relu -> grouped Conv (-> output)."""
    rng = np.random.default_rng(0)

    def init(name, *shape, positive=False):
        value = rng.normal(size=shape).astype(np.float32)
        return numpy_helper.from_array(np.abs(value) + 0.5 if positive else value, name)

    inits = [init("w1", 8, 4, 3, 3), init("s1", 8), init("b1", 8), init("m1", 8), init("v1", 8, positive=True),
             init("w2", 8, 8, 3, 3), init("s2", 8), init("b2", 8), init("m2", 8), init("v2", 8, positive=True),
             init("w3", 8, 4, 3, 3)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s1", "b1", "m1", "v1"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "s2", "b2", "m2", "v2"], ["n2"], name="bn2"),
             helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="grouped", pads=[1, 1, 1, 1], group=2)]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run(model, images):
    session = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})


def zero_channels(graph, chosen):
    """The analysed model with the chosen (group root -> indices) channels zeroed wherever they
    appear: producers' rows, consumers' columns, BatchNorm parameters, biases."""
    model = onnx.ModelProto.FromString(graph.model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    for slice_ in graph.slices:
        array = numpy_helper.to_array(inits[slice_.initializer]).copy()
        moved = np.moveaxis(array, slice_.axis, 0)
        for position, (gid, index) in enumerate(slice_.channel_map):
            if gid >= 0 and graph.root(int(gid)) in chosen and index in chosen[graph.root(int(gid))]:
                moved[position] = 0
        inits[slice_.initializer].CopyFrom(numpy_helper.from_array(array, slice_.initializer))
    return model


def step(params, model_path, workdir, data=None):
    config = parse_step("prune", params)
    return handler_for(config)(config, StepContext(model_path, model_path, workdir, data or {}, lambda s, f: None))


@pytest.mark.parametrize("build", ["zoo", "bn"])
@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale"])
def test_removed_channels_are_the_least_important_and_the_function_is_unchanged(tmp_path, build, importance):
    path = export(Zoo(), tmp_path / "zoo.onnx") if build == "zoo" else bn_graph(tmp_path / "bn.onnx")
    graph = channel_graph.analyse(onnx.load(str(path)))
    assert graph.prunable()
    rng = np.random.default_rng(1)
    counts = channel_graph.keep_counts(graph, 0.5, 1)
    # Zero random channels (not the first ones) of every group: they become the least important.
    chosen = {root: set(rng.choice(graph.groups[root].size, graph.groups[root].size - counts[root], replace=False).tolist())
              for root in graph.prunable()}
    assert any(indices != set(range(len(indices))) for indices in chosen.values())  # not a prefix
    zeroed = zero_channels(graph, chosen)
    zeroed_path = tmp_path / "zeroed.onnx"
    onnx.save(zeroed, str(zeroed_path))

    result = step({"method": "channels", "ratio": 0.5, "round_to": 1, "importance": importance}, zeroed_path, tmp_path)
    pruned = onnx.load(str(result.model_path))
    images = np.random.default_rng(2).random((5, *([1, 8, 8] if build == "zoo" else [4, 8, 8]))).astype(np.float32)
    for before, after in zip(run(zeroed, images), run(pruned, images)):
        assert before.shape == after.shape
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert result.metrics["parameters"][1] < result.metrics["parameters"][0]
    assert result.metrics["macs"][1] < result.metrics["macs"][0]
    # The report's layer table states the shapes the artifact really has.
    shapes = {n.name: [t for t in pruned.graph.initializer if t.name == n.input[1]][0].dims for n in pruned.graph.node if n.op_type == "Conv"}
    for layer in result.metrics["layers"]:
        if layer["op_type"] == "Conv":
            assert shapes[layer["layer"]][0] == layer["out_channels"][1]
    if build == "bn":
        left = result.metrics["left"]
        assert any("grouped convolution" in entry["reason"] and "conv2" in entry["layers"] for entry in left)
        bn1 = {t.name: t.dims for t in pruned.graph.initializer}
        assert bn1["s1"] == [4] and bn1["w2"] == [8, 4, 3, 3]


def test_zoo_dependencies_are_tied(tmp_path):
    graph = channel_graph.analyse(onnx.load(str(export(Zoo(), tmp_path / "zoo.onnx"))))
    groups = {tuple(sorted(layer.split("/")[-2] for layer in graph.layers(root))) for root in graph.prunable()}
    assert ("a", "stem") in groups  # residual addition
    assert ("pw", "se2") in groups  # squeeze-excite scales pw's channels
    assert ("se1",) in groups and ("b1",) in groups and ("b2",) in groups
    reasons = " ".join(graph.blocked.values())
    assert "graph output" in reasons  # the detection head keeps its 6 channels and the classifier its 10
    pruned = channel_graph.apply(graph, channel_graph.choose(importance.by_name("l2").scores(graph), channel_graph.keep_counts(graph, 0.5, 4)))
    reshape_shape = [numpy_helper.to_array(t) for t in pruned.graph.initializer
                     if t.name in graph.reshapes][0]
    head = [t for t in pruned.graph.initializer if t.name == "head.weight"][0]
    assert reshape_shape[-1] == head.dims[1] == 12 * 16  # b1 8->4, b2 16->8: 12 channels of 4x4
    logits, det = run(pruned, np.zeros((3, 1, 8, 8), np.float32))
    assert logits.shape == (3, 10) and det.shape == (3, 6, 4, 4)


def test_round_to_gives_multiples(tmp_path):
    graph = channel_graph.analyse(onnx.load(str(export(Zoo(), tmp_path / "zoo.onnx"))))
    counts = channel_graph.keep_counts(graph, 0.3, 8)
    assert all(count % 8 == 0 or count == graph.groups[root].size for root, count in counts.items())


def test_magnitude_zeroes_the_smallest_weights_not_the_first_rows(tmp_path):
    path = export(Zoo(), tmp_path / "zoo.onnx")
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    result = step({"method": "magnitude", "sparsity": 0.6, "min_weights": 0}, path, tmp_path)
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(result.model_path)).graph.initializer}
    assert result.metrics["layers"]
    checked = 0
    for name, before in original.items():
        after = pruned[name]
        if before.ndim < 2 or name.startswith("bn") or np.array_equal(before, after):
            continue
        zero = after == 0
        assert abs(zero.mean() - 0.6) < 0.01
        # Every removed weight is smaller in magnitude than every kept one.
        assert np.abs(before[zero]).max() <= np.abs(before[~zero]).min()
        # Not whole filters by position: the first output filter keeps some weights.
        assert not zero[0].all()
        checked += 1
    assert checked >= 8
    assert zstandard.ZstdDecompressor().decompress(result.artifacts["model.onnx.zst"].read_bytes()) == result.model_path.read_bytes()
    assert result.metrics["size_bytes_compressed"] < result.metrics["size_bytes_dense"]


def test_small_and_depthwise_layers_are_left_and_listed(tmp_path):
    path = export(Zoo(), tmp_path / "zoo.onnx")
    result = step({"method": "magnitude", "sparsity": 0.5}, path, tmp_path)  # min_weights 1024 by default
    left = {entry["layer"].split("/")[-2]: entry["reason"] for entry in result.metrics["left"]}
    assert "depthwise" in left["dw"] and "min_weights" in left["stem"]
    assert {layer["layer"].split("/")[-2] for layer in result.metrics["layers"]} == {"a", "b1", "head"}


def test_global_magnitude_uses_one_threshold(tmp_path):
    path = export(Zoo(), tmp_path / "zoo.onnx")
    before = onnx.load(str(path))
    result = step({"method": "magnitude", "sparsity": 0.5, "scope": "global", "min_weights": 0}, path, tmp_path)
    after = onnx.load(str(result.model_path))
    pruned_layers = {layer["layer"] for layer in result.metrics["layers"]}  # depthwise convs are left
    names = {n.input[1] for n in before.graph.node if n.name in pruned_layers}
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer if t.name in names}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer if t.name in names}
    removed = np.concatenate([np.abs(old[n][new[n] == 0]) for n in old])
    kept = np.concatenate([np.abs(old[n][new[n] != 0]) for n in old])
    assert removed.max() <= kept.min()
    sparsities = [layer["sparsity"] for layer in result.metrics["layers"]]
    assert max(sparsities) - min(sparsities) > 0.1  # layers end up with different sparsities


def test_n_m_keeps_the_largest_n_of_every_m_along_the_input(tmp_path):
    path = export(Zoo(), tmp_path / "zoo.onnx")
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    model_after = onnx.load(str(step({"method": "n_m", "n": 2, "m": 4, "min_weights": 0}, path, tmp_path).model_path))
    after = {t.name: numpy_helper.to_array(t) for t in model_after.graph.initializer}
    convs = [n for n in model_after.graph.node if n.op_type == "Conv"]
    checked = 0
    for node in convs:
        old, new = before[node.input[1]], after[node.input[1]]
        if old.shape[1] % 4:
            assert np.array_equal(old, new)  # the stem (1 input channel) and depthwise convs are left
            continue
        old_groups = np.moveaxis(old, 1, -1).reshape(-1, 4)
        new_groups = np.moveaxis(new, 1, -1).reshape(-1, 4)
        assert (np.count_nonzero(new_groups, axis=1) <= 2).all()
        kept = np.sort(np.abs(old_groups), axis=1)[:, 2:]
        np.testing.assert_array_equal(np.sort(np.abs(new_groups), axis=1)[:, 2:], kept)
        checked += 1
    assert checked >= 4


def test_taylor_importance_uses_gradients(tmp_path):
    path = export(Zoo(), tmp_path / "zoo.onnx")
    data = ImageSet(np.random.default_rng(0).random((32, 1, 8, 8)).astype(np.float32), None)
    (tmp_path / "l2").mkdir(), (tmp_path / "taylor").mkdir()
    l2 = step({"method": "channels", "ratio": 0.5, "round_to": 1, "importance": "l2"}, path, tmp_path / "l2", {"calibration": data})
    taylor = step({"method": "channels", "ratio": 0.5, "round_to": 1, "importance": "taylor"}, path, tmp_path / "taylor", {"calibration": data})
    assert l2.metrics["parameters"][1] == taylor.metrics["parameters"][1]  # same widths...
    a = onnx.load(str(l2.model_path))
    b = onnx.load(str(taylor.model_path))
    assert any(not np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))
               for x, y in zip(a.graph.initializer, b.graph.initializer))  # ...different channels


def test_without_finetuning_the_channel_statistics_travel_beside_the_pruned_model(tmp_path):
    """A distill step after prune starts each kept channel from its statistics in the unpruned
    model: prune leaves them beside its output, indexed like the pruned convolutions."""
    from worker.engine import train_norm

    path = export(Zoo(), tmp_path / "zoo.onnx")
    data = ImageSet(np.random.default_rng(0).random((32, 1, 8, 8)).astype(np.float32), None)
    original = train_norm.output_statistics(path, data.images, "cpu")
    result = step({"method": "channels", "ratio": 0.5, "round_to": 1}, path, tmp_path, {"calibration": data})
    saved = train_norm.load_targets(result.model_path)
    pruned = onnx.load(str(result.model_path))
    widths = {n.name: next(t.dims[0] for t in pruned.graph.initializer if t.name == n.input[1]) for n in pruned.graph.node if n.op_type == "Conv"}
    assert saved is not None and set(saved) == set(original)
    assert all(len(saved[name][0]) == widths[name] for name in saved)
    assert any(len(saved[name][0]) < len(original[name][0]) for name in saved)
    # Each kept channel's statistics are the original's for the channel with the same weights.
    stem = next(n for n in pruned.graph.node if n.op_type == "Conv")
    before = numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer if t.name == stem.input[1]))
    after = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == stem.input[1]))
    for channel, row in enumerate(after):
        source = next(i for i in range(len(before)) if np.array_equal(before[i], row))
        assert saved[stem.name][0][channel] == original[stem.name][0][source]
        assert saved[stem.name][1][channel] == original[stem.name][1][source]


def test_target_macs_finds_the_ratio(tmp_path):
    path = export(Zoo(), tmp_path / "zoo.onnx")
    result = step({"method": "channels", "target_macs": 0.5, "round_to": 2}, path, tmp_path)
    before, after = result.metrics["macs"]
    assert after / before <= 0.5 and after / before > 0.3


def test_target_params_finds_the_ratio(tmp_path):
    def weights(path):  # counted here, not by the step's graph_stats: the float initializers' elements
        return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer if t.data_type == TensorProto.FLOAT)

    path = export(Zoo(), tmp_path / "zoo.onnx")
    result = step({"method": "channels", "target_params": 0.5, "round_to": 2}, path, tmp_path)
    ratio = weights(result.model_path) / weights(path)
    # At most the target; the smallest pruning that reaches it, so not far below (a ratio found for
    # MACs instead, or a fixed default, lands elsewhere: the Zoo's MACs and weights shrink differently).
    assert 0.35 < ratio <= 0.5, ratio
    assert result.metrics["target_params"] == 0.5


def test_a_model_with_nothing_prunable_is_refused(tmp_path):
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="only")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w")])
    path = tmp_path / "one.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(EngineError) as caught:
        step({"method": "channels"}, path, tmp_path)
    assert caught.value.code == "nothing_to_prune"


# --- through the API ------------------------------------------------------------------------------

@pytest.fixture
def uploads(client, reference):
    return {"onnx": upload_model(client, reference.onnx)["id"], "pt2": upload_model(client, reference.pt2)["id"],
            "torchscript": upload_model(client, reference.torchscript)["id"],
            "eval": upload_dataset(client, reference.eval_npz)["id"], "train": upload_dataset(client, reference.train_npz)["id"]}


def submit(client, model_id, params, data):
    # The floor off: these jobs check what pruning removes and that the artifact runs, at ratios
    # that cost 15-25 top-1 points on purpose (the floor would fail them: tests/test_floor_jobs.py).
    return client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "prune", "params": params}], "data": data,
                                         "floor": "off"})


@pytest.mark.parametrize("model_format", ["onnx", "pt2", "torchscript"])
@pytest.mark.parametrize("params", [
    {"method": "channels", "ratio": 0.5, "round_to": 4, "finetune": {"epochs": 2, "distill": True}},
    {"method": "magnitude", "sparsity": 0.7, "min_weights": 0, "finetune": {"epochs": 1}},
    {"method": "n_m", "min_weights": 0},
])
def test_prune_through_the_api(client, reference, uploads, tmp_path, model_format, params):
    response = submit(client, uploads[model_format], params, {"eval": uploads["eval"], "train": uploads["train"]})
    assert response.status_code == 202, response.text
    job, _ = wait_finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    metrics = job["metrics"]
    prune = metrics["steps"][0]
    path = tmp_path / "model.onnx"
    path.write_bytes(client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: reference.eval_images.astype(np.float32) / 255.0})[0]
    assert logits.shape == (len(reference.eval_images), 10)
    # Judged here, not by the step's report: the artifact's own accuracy on the eval images.
    independent = float(np.mean(logits.argmax(1) == reference.eval_labels))
    assert abs(metrics["compressed"]["accuracy"]["top1"] - independent) <= 1 / len(reference.eval_labels)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if len(t.dims) >= 2]
    zeros = sum(int(np.sum(w == 0)) for w in weights) / sum(w.size for w in weights)
    # Measured (onnx upload; pt2 and TorchScript are the same module), original 0.992: channels 0.5 +
    # 2 distilled epochs 0.844 with 0.0 zeros; magnitude 0.7 + 1 epoch 0.856 with 0.700 zeros; 2:4
    # without recovery 0.742 with 0.498 zeros (layers whose width is not a multiple of 4 keep a
    # remainder). Pruning the wrong weights or none at all misses these by far.
    floor_top1, floor_zeros = {"channels": (0.75, 0.0), "magnitude": (0.75, 0.69), "n_m": (0.6, 0.45)}[params["method"]]
    assert independent >= floor_top1 and zeros >= floor_zeros, (independent, zeros)
    quality = prune["quality"]
    assert quality["before"]["top1"] > 0.9 and quality["after_pruning"]["top1"] is not None
    if params.get("finetune"):
        assert quality["after_recovery"]["top1"] is not None and prune["iterations"][0]["finetune"]["history"]
    assert metrics["compressed"]["latency"]["batch_32"]["p50_ms"] > 0
    if params["method"] == "channels":
        assert metrics["compressed"]["parameters"] < 0.5 * metrics["original"]["parameters"]
        model = onnx.load(str(path))
        widths = {n.name: [t for t in model.graph.initializer if t.name == n.input[1]][0].dims[0]
                  for n in model.graph.node if n.op_type == "Conv"}
        for layer in prune["layers"]:
            if layer["op_type"] == "Conv":
                assert widths[layer["layer"]] == layer["out_channels"][1]
        assert quality["after_recovery"]["top1"] > quality["after_pruning"]["top1"]
    else:
        names = [a["name"] for a in job["artifacts"]]
        assert "model.onnx.zst" in names
        packed = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx.zst").content
        assert zstandard.ZstdDecompressor().decompress(packed) == path.read_bytes()
        assert prune["size_bytes_compressed"] < prune["size_bytes_dense"]
        assert metrics["compressed"]["sparsity"] > (0.45 if params["method"] == "n_m" else 0.65)
        if params["method"] == "n_m":
            assert all(layer["n_m_verified"] for layer in prune["layers"])


@pytest.mark.parametrize(("params", "data", "code"), [
    ({"method": "channels", "ratio": 1.0}, {}, "invalid_step_params"),
    ({"method": "channels", "ratio": -0.1}, {}, "invalid_step_params"),
    ({"method": "n_m", "n": 4, "m": 2}, {}, "invalid_step_params"),
    ({"method": "magnitude", "ratio": 0.5}, {}, "invalid_step_params"),
    ({"method": "channels", "ratio": 0.3, "target_macs": 0.5}, {}, "invalid_step_params"),
    ({"method": "channels", "finetune": {"epochs": 1}}, {"eval": "eval"}, "train_data_required"),
    ({"method": "channels", "importance": "taylor"}, {"eval": "eval"}, "calibration_data_required"),
])
def test_bad_prune_parameters_are_422(client, uploads, params, data, code):
    data = {role: uploads[value] for role, value in data.items()}
    response = submit(client, uploads["onnx"], params, data or {"eval": uploads["eval"]})
    assert_problem(response, 422, code)


def test_finetune_without_labels_needs_distill(client, reference, uploads):
    unlabelled = upload_dataset(client, reference.calib_npz)["id"]
    response = submit(client, uploads["onnx"], {"method": "channels", "finetune": {"epochs": 1}}, {"eval": uploads["eval"], "train": unlabelled})
    assert_problem(response, 422, "train_labels_required")
    response = submit(client, uploads["onnx"], {"method": "channels", "finetune": {"epochs": 1, "distill": True}},
                      {"eval": uploads["eval"], "train": unlabelled})
    assert response.status_code == 202


def test_pruning_a_quantized_model_is_refused(client, uploads):
    first = client.post("/v1/jobs", json={"model_id": uploads["onnx"], "data": {"eval": uploads["eval"]},
                                          "steps": [{"type": "quantize", "params": {"method": "dynamic_int8"}},
                                                    {"type": "prune", "params": {"method": "magnitude"}}]})
    job, _ = wait_finished(client, first.json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "model_already_quantized"
