"""Preflight (worker/engine/preflight.py): each finding on a small hand-built graph against a reference
computed here (ONNX Runtime's own quantizer for the ops it leaves float, numpy for the ranges, the
MAC formula by hand), failures recorded instead of raised, and a real job's metrics and report."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from worker.engine.graph_stats import count_macs
from worker.engine.preflight import WIDE_JOIN_RATIO, preflight

RNG = np.random.default_rng(0)


def save(path, nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def tensor(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def weight(name, shape):
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


# --- ops left float -----------------------------------------------------------------------------

def left_float_by_ort(path, tmp_path, sample):
    """The nodes ONNX Runtime's static quantizer really leaves float: in its QDQ output, a node is
    quantized when every input comes from a DequantizeLinear and every output goes to a QuantizeLinear."""
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": sample}])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(path), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    model = onnx.load(str(tmp_path / "q.onnx"))
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    consumers = {name: node.op_type for node in model.graph.node for name in node.input}
    weights = {t.name for t in model.graph.initializer}
    return {node.name for node in model.graph.node if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and not (all(producer.get(i) == "DequantizeLinear" for i in node.input if i not in weights)
                     and all(consumers.get(o) == "QuantizeLinear" for o in node.output))}


def test_float_ops_are_the_ones_onnx_runtimes_quantizer_leaves_float(tmp_path):
    path = save(tmp_path / "m.onnx", [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Exp", ["c"], ["e"], name="exp"),
        helper.make_node("Erf", ["e"], ["f"], name="erf"),
        helper.make_node("Conv", ["f", "w2"], ["y"], name="conv2"),
        helper.make_node("Shape", ["y"], ["s"], name="shape"),  # int64 shape arithmetic: no activation to quantize
    ], [tensor("x", ["n", 3, 8, 8])], [tensor("y", None), tensor("s", None, TensorProto.INT64)],
        [weight("w1", (4, 3, 3, 3)), weight("w2", (4, 4, 1, 1))])
    sample = RNG.uniform(size=(4, 3, 8, 8)).astype(np.float32) * 0.1
    found = preflight(path, sample)["float_ops"]
    assert left_float_by_ort(path, tmp_path, sample) - {"shape"} == {"exp", "erf"}  # Shape: an int64 output, nothing to quantize
    assert {(op["op_type"], op["count"], tuple(op["nodes"])) for op in found} == {("Exp", 1, ("exp",)), ("Erf", 1, ("erf",))}


def test_custom_domain_ops_are_listed_and_a_model_that_cannot_run_only_loses_the_run(tmp_path):
    path = save(tmp_path / "custom.onnx", [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("FancyNorm", ["r"], ["a"], name="fancy0", domain="com.example"),
        helper.make_node("FancyNorm", ["a"], ["b"], name="fancy1", domain="com.example"),
        helper.make_node("Concat", ["r", "b"], ["y"], name="join", axis=1),
    ], [tensor("x", [1, 2, 4, 4])], [tensor("y", None)], domains=["com.example"])
    result = preflight(path, np.ones((1, 2, 4, 4), np.float32))
    assert result["unknown_ops"] == [{"domain": "com.example", "op_type": "FancyNorm", "count": 2, "nodes": ["fancy0", "fancy1"]}]
    assert "error" in result["wide_joins"]  # ONNX Runtime has no FancyNorm kernel: that finding alone is lost
    assert "error" not in result and result["seconds"] >= 0


def test_a_file_that_is_no_model_gives_an_error_not_an_exception(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    result = preflight(tmp_path / "junk.onnx", None)
    assert set(result) == {"error", "seconds"} and result["error"]


# --- wide joins ---------------------------------------------------------------------------------

def test_joins_of_very_different_ranges_are_found_with_their_ratio(tmp_path):
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["pixels"], name="scale"),
        helper.make_node("Sigmoid", ["x"], ["scores"], name="sigmoid"),
        helper.make_node("Concat", ["pixels", "scores"], ["joined"], name="wide_concat", axis=1),
        helper.make_node("Reshape", ["joined", "shape"], ["y"], name="reshape"),
        helper.make_node("Tanh", ["x"], ["t"], name="tanh"),
        helper.make_node("Concat", ["scores", "t"], ["alike"], name="alike_concat", axis=1),  # ranges within 2x
        helper.make_node("Add", ["pixels", "t"], ["summed"], name="wide_add"),
        helper.make_node("Add", ["scores", "bias"], ["biased"], name="bias_add"),  # a bias: no join
        helper.make_node("Exp", ["summed"], ["z"], name="exp"),
    ]
    constants = [numpy_helper.from_array(np.array(640.0, np.float32), "k"), numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
                 numpy_helper.from_array(np.full((1, 2), 1e-4, np.float32), "bias")]
    path = save(tmp_path / "joins.onnx", nodes, [tensor("x", ["n", 2])],
                [tensor("y", None), tensor("alike", None), tensor("z", None), tensor("biased", None)], constants)
    sample = RNG.uniform(-1, 1, (40, 2)).astype(np.float32)
    result = preflight(path, sample)["wide_joins"]
    used = sample[:16]  # at most 16 images are run
    pixels, scores, t = np.abs(used * 640).max(), (1 / (1 + np.exp(-used))).max(), np.abs(np.tanh(used)).max()
    assert result["samples"] == 16 and result["checked"] == 3 and result["threshold"] == WIDE_JOIN_RATIO
    joins = {join["node"]: join for join in result["joins"]}
    assert set(joins) == {"wide_concat", "wide_add"}
    assert joins["wide_concat"]["ratio"] == pytest.approx(pixels / scores, abs=0.06)  # rounded to 0.1
    assert joins["wide_add"]["ratio"] == pytest.approx(pixels / t, abs=0.06)
    assert [i["max_abs"] for i in joins["wide_concat"]["inputs"]] == pytest.approx([pixels, scores], rel=1e-6)
    assert joins["wide_concat"]["feeds_outputs"] == ["y"]  # through a Reshape: the user reads it
    assert joins["wide_add"]["feeds_outputs"] == []  # an Exp computes on it first
    assert '"wide_activations": ["wide_concat"]' in joins["wide_concat"]["hint"]
    widest_first = sorted(joins, key=lambda name: -{"wide_concat": pixels / scores, "wide_add": pixels / t}[name])
    assert [join["node"] for join in result["joins"]] == widest_first


# --- dynamic dimensions and MACs -----------------------------------------------------------------

def test_macs_are_counted_at_the_datas_shape_when_the_graph_leaves_it_open(tmp_path):
    path = save(tmp_path / "dynamic.onnx", [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc"),
    ], [tensor("x", ["n", 3, "h", "w"])], [tensor("y", ["n", 10])], [weight("w", (8, 3, 3, 3)), weight("fc", (8, 10))])
    result = preflight(path, np.zeros((5, 3, 16, 24), np.float32))
    # By hand: the conv's 8x16x24 outputs each sum 3x3x3 products; the Gemm 10 outputs of 8.
    assert result["macs"] == {"batch_1": 8 * 16 * 24 * 27 + 10 * 8, "input": "x", "input_shape": [1, 3, 16, 24],
                              "shape_from": "eval data"}
    assert count_macs(onnx.load(str(path))) is None  # what the declared shape alone gives
    assert result["dynamic_dims"] == [
        {"kind": "input", "tensor": "x", "axis": 0, "name": "n"}, {"kind": "input", "tensor": "x", "axis": 2, "name": "h"},
        {"kind": "input", "tensor": "x", "axis": 3, "name": "w"}, {"kind": "output", "tensor": "y", "axis": 0, "name": "n"}]
    without_data = preflight(path, None)
    assert without_data["macs"]["batch_1"] is None and without_data["macs"]["shape_from"] == "declared shape"
    assert without_data["wide_joins"] is None


def test_a_fixed_shape_counts_as_declared(tmp_path):
    path = save(tmp_path / "fixed.onnx", [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                [tensor("x", ["n", 3, 8, 8])], [tensor("y", None)], [weight("w", (4, 3, 1, 1))])
    result = preflight(path, np.zeros((2, 3, 8, 8), np.float32))
    assert result["macs"] == {"batch_1": 4 * 8 * 8 * 3, "input": "x", "input_shape": [1, 3, 8, 8], "shape_from": "declared shape"}
    assert result["float_ops"] == [] and result["unknown_ops"] == [] and result["wide_joins"]["joins"] == []


# --- a real job ----------------------------------------------------------------------------------

def test_a_jobs_metrics_and_report_carry_the_preflight_with_the_detectors_wide_concat(client, reference, tmp_path):
    from tests.test_wide_activations import ConcatHead

    torch.manual_seed(0)
    path = tmp_path / "detector.onnx"
    model = ConcatHead().eval()
    torch.onnx.export(model, torch.zeros(1, 1, 8, 8), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    model_id = upload_model(client, path)["id"]
    data = upload_dataset(client, reference.calib_npz)["id"]
    response = client.post("/v1/jobs", json={"model_id": model_id, "data": {"calibration": data}, "floor": "off",
                                             "steps": [{"type": "quantize", "params": {"method": "static_int8"}}]})
    assert response.status_code == 202, response.text
    job, _ = wait_finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    checks = job["metrics"]["preflight"]
    [join] = checks["wide_joins"]["joins"]
    # The reference ranges: pixel boxes (up to 640) and sigmoid scores (up to 1), from torch on the
    # 16 images the job's preflight ran (the dataset's first 16, scaled as the job scales them).
    images = torch.from_numpy(np.load(reference.calib_npz)["images"][:16].astype(np.float32) / 255.0)
    with torch.no_grad():
        y = model(images).numpy()
    expected = np.abs(y[:, :4]).max() / np.abs(y[:, 4:]).max()
    assert join["op_type"] == "Concat" and join["feeds_outputs"] == ["y"]
    assert join["ratio"] == pytest.approx(expected, rel=1e-3)  # an input's range 0.1 % off would show
    assert expected > WIDE_JOIN_RATIO and "wide_activations" in join["hint"]
    assert checks["dynamic_dims"][0] == {"kind": "input", "tensor": "x", "axis": 0, "name": "n"}
    assert checks["macs"]["batch_1"] == job["metrics"]["original"]["macs"]  # batch only dynamic: the same count
    assert checks["unknown_ops"] == [] and 0 < checks["seconds"] < 60
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.html").text
    assert "<h2>Preflight</h2>" in report and join["node"] in report and "wide_activations" in report
    assert json.loads(client.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json").content)["preflight"] == checks


def test_the_run_takes_fewer_images_when_each_costs_many_macs():
    from worker.engine.preflight import MAX_RUN_MACS, MAX_SAMPLES, UNKNOWN_COST_SAMPLES, _affordable
    assert _affordable(0) == MAX_SAMPLES == 16 and _affordable(MAX_RUN_MACS // 16) == 16
    assert _affordable(616_562_688) == 4  # the 8.7 MB detector measured in docs/METRICS.md: 0.29 s
    assert _affordable(MAX_RUN_MACS * 3) == 1 and _affordable(None) == UNKNOWN_COST_SAMPLES


def test_the_report_says_when_preflight_or_one_finding_failed():
    from worker.engine.report import render
    whole = render({"preflight": {"error": "DecodeError: not a model", "seconds": 0.001}})
    assert "Preflight" in whole and "not completed: DecodeError: not a model" in whole
    part = render({"preflight": {"float_ops": [{"op_type": "Exp", "count": 2, "nodes": ["a", "b"]}], "unknown_ops": [],
                                 "dynamic_dims": [], "macs": {"error": "x"}, "wide_joins": {"error": "y"}, "seconds": 0.01}})
    assert "Ops left float by the quantizer: Exp ×2" in part and "Not checked (failed): macs, wide_joins" in part


def test_a_graph_with_control_flow_is_not_run(tmp_path):
    # A Loop whose trip count makes every run take minutes (tests/test_bounded_runs.py): preflight
    # reads its graph and leaves the run out, so the job reaches its steps at once.
    import time

    from tests.test_bounded_runs import slow_model

    path = slow_model(tmp_path / "slow.onnx", trips=10**9)
    started = time.monotonic()
    checks = preflight(path, np.zeros((4, 1, 8, 8), np.float32))
    assert time.monotonic() - started < 30  # a run would take far longer than this
    assert checks["wide_joins"]["joins"] == [] and "Loop" in checks["wide_joins"]["skipped"]
