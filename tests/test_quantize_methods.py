"""Every quantize method through the API: the artifact really stores what the method promises and
runs in ONNX Runtime; bad parameters are clear 422s."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.test_models_api import assert_problem


@pytest.fixture
def ids(client, reference):
    return upload_model(client, reference.onnx)["id"], upload_dataset(client, reference.eval_npz)["id"]


def run(client, ids, params, tmp_path, data=None):
    model_id, data_id = ids
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "quantize", "params": params}],
                                             "data": data or {"eval": data_id}})
    assert response.status_code == 202, response.text
    job, _ = wait_finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    path = tmp_path / f"{params['method']}.onnx"
    path.write_bytes(client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content)
    return job, onnx.load(str(path)), path


def runs_like_the_original(path, reference, min_agreement):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = reference.eval_images.astype(np.float32) / 255.0
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert float(np.mean(logits.argmax(1) == reference.eval_labels)) > min_agreement


def test_dynamic_int8_needs_no_calibration_and_reports_its_speed(client, reference, ids, tmp_path):
    job, model, path = run(client, ids, {"method": "dynamic_int8"}, tmp_path)
    assert {"DynamicQuantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert "speedup_batch_1" in job["metrics"]["comparison"]  # slower than fp32 on CNNs, and it says so
    runs_like_the_original(path, reference, 0.85)


def test_fp16_keeps_fp32_inputs_and_outputs(client, reference, ids, tmp_path):
    job, model, path = run(client, ids, {"method": "fp16"}, tmp_path)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert job["metrics"]["comparison"]["size_ratio"] > 1.6
    runs_like_the_original(path, reference, 0.85)


@pytest.mark.parametrize(("bits", "block_size", "data_type"), [(8, None, onnx.TensorProto.INT8), (4, None, onnx.TensorProto.INT4),
                                                                (4, 16, onnx.TensorProto.INT4)])
def test_weight_only_stores_low_bit_weights_for_conv_and_gemm(client, reference, ids, tmp_path, bits, block_size, data_type):
    params = {"method": "weight_only", "bits": bits, "keep_first_last": False, **({"block_size": block_size} if block_size else {})}
    job, model, path = run(client, ids, params, tmp_path)
    consumers = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    low_bit = [t for t in model.graph.initializer if t.data_type == data_type and not t.name.endswith("_zero_point")]
    assert low_bit and all(t.name in consumers for t in low_bit)
    quantized_ops = {layer["op"] for layer in job["metrics"]["steps"][0]["quantized_layers"]}
    assert {"Conv", "Gemm"} <= quantized_ops
    if block_size:
        assert any(any(a.name == "block_size" and a.i == 16 for a in n.attribute) for n in consumers.values())
    # The tiny test model has per-tensor overheads; bench/ measures the full-size ratios.
    assert job["metrics"]["comparison"]["size_ratio"] > (2.5 if bits == 8 else 3.5)
    runs_like_the_original(path, reference, 0.85)


def test_codebook_has_at_most_2_to_the_bits_values_per_layer(client, reference, ids, tmp_path):
    job, model, path = run(client, ids, {"method": "codebook", "bits": 3}, tmp_path)
    codebooks = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_codebook")]
    assert codebooks and all(c.size == 8 for c in codebooks)
    assert {"Gather", "DequantizeLinear", "Cast"} <= {n.op_type for n in model.graph.node}
    assert all(t.data_type == onnx.TensorProto.UINT4 for t in model.graph.initializer if t.name.endswith("_codes"))
    assert job["metrics"]["comparison"]["size_ratio"] > 3.5
    runs_like_the_original(path, reference, 0.8)


def test_excluded_layers_stay_float(client, reference, ids, tmp_path):
    job, model, _ = run(client, ids, {"method": "weight_only", "exclude": ["Gemm"]}, tmp_path)
    skipped = job["metrics"]["steps"][0]["float_layers"]
    assert [s["reason"] for s in skipped] == ["excluded"]
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] in {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}


@pytest.mark.parametrize(("params", "code"), [
    ({"method": "int3"}, "invalid_step_params"),
    ({"method": "weight_only", "bits": 3}, "invalid_step_params"),
    ({"method": "codebook", "bits": 9}, "invalid_step_params"),
    ({"method": "static_int8", "bits": 4}, "invalid_step_params"),
    ({"method": "fp16", "bits": 8}, "invalid_step_params"),
    ({"method": "static_int8", "block_size": 32}, "invalid_step_params"),
    ({"method": "static_int8"}, "calibration_data_required"),
    ({"method": "dynamic_int8", "adaround": True}, "invalid_step_params"),
    ({"method": "static_int8", "bias_correction": "always"}, "invalid_step_params"),
    ({"method": "static_int8", "wide_activations": ["Concat"] * 1001}, "invalid_step_params"),
    ({"method": "static_int8", "tensor_precision": {"conv1_out": "int4"}}, "invalid_step_params"),
    ({"method": "static_int8", "tensor_precision": {"x" * 1001: "float"}}, "invalid_step_params"),
])
def test_bad_parameters(client, ids, params, code):
    model_id, data_id = ids
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "quantize", "params": params}],
                                             "data": {"eval": data_id}})
    assert_problem(response, 422, code)


def test_static_int8_repairs_through_the_api(client, reference, ids, tmp_path):
    """Equalization, AdaRound and sequential bias correction in one job on the reference CNN: each
    reports what it did, and the int8 model still classifies like the original."""
    model_id, data_id = ids
    params = {"method": "static_int8", "equalize": True, "adaround": True, "bias_correction": "sequential",
              "wide_activations": ["Gemm"]}
    job, model, path = run(client, ids, params, tmp_path, data={"calibration": data_id, "eval": data_id})
    step = job["metrics"]["steps"][0]
    assert step["equalization"]["pairs"] >= 1
    assert step["adaround"]["layers"] >= 3 and step["adaround"]["mean_mse_adaround"] <= step["adaround"]["mean_mse_nearest"]
    assert step["bias_correction"]["mean_shift_after"] < step["bias_correction"]["mean_shift_before"]
    assert step["wide_activations"]
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer) >= 3
    assert job["metrics"]["comparison"]["fidelity"][0]["top1_agreement"] >= 0.98
    runs_like_the_original(path, reference, 0.9)


def test_qat_fine_tunes_with_fake_quantization_and_exports_qdq(client, reference, ids, tmp_path):
    model_id, eval_id = ids
    train_id = upload_dataset(client, reference.eval_npz)["id"]
    job, model, path = run(client, ids, {"method": "qat", "epochs": 2, "lr": 1e-4}, tmp_path,
                           data={"train": train_id, "eval": eval_id})
    step = job["metrics"]["steps"][0]
    assert step["method"] == "qat" and len(step["loss_per_epoch"]) == 2 and step["device"] in ("cpu", "cuda")
    assert step["int8_compute_nodes"] > 0
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert job["metrics"]["comparison"]["accuracy_drop"] < 0.03
    runs_like_the_original(path, reference, 0.85)


def test_qat_label_free_with_distillation(client, reference, ids, tmp_path):
    model_id, eval_id = ids
    unlabelled = upload_dataset(client, reference.calib_npz)["id"]
    job, _, _ = run(client, ids, {"method": "qat", "distill": True}, tmp_path, data={"train": unlabelled, "eval": eval_id})
    assert job["metrics"]["steps"][0]["distill"] is True
    assert job["metrics"]["comparison"]["fidelity"][0]["top1_agreement"] > 0.9


def test_qat_needs_training_data(client, ids):
    model_id, eval_id = ids
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "quantize", "params": {"method": "qat"}}],
                                             "data": {"eval": eval_id}})
    assert_problem(response, 422, "train_data_required")


def test_training_methods_go_to_the_gpu_queue_when_there_is_one(tmp_path, reference):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path, gpu_queue=True))) as client:
        model_id = upload_model(client, reference.onnx)["id"]
        data_id = upload_dataset(client, reference.eval_npz)["id"]
        body = {"model_id": model_id, "data": {"train": data_id, "calibration": data_id, "eval": data_id}}
        qat = client.post("/v1/jobs", json={**body, "steps": [{"type": "quantize", "params": {"method": "qat"}}]}).json()
        static = client.post("/v1/jobs", json={**body, "steps": [{"type": "quantize"}]}).json()
        assert (qat["queue"], static["queue"]) == ("gpu", "cpu")
        for job in (qat, static):
            wait_finished(client, job["id"])


def test_low_bit_defaults_keep_the_first_and_last_layers_float(client, reference, ids, tmp_path):
    job, model, _ = run(client, ids, {"method": "weight_only", "bits": 4}, tmp_path)
    step = job["metrics"]["steps"][0]
    assert job["steps"][0]["params"]["keep_first_last"] is True
    reasons = sorted(entry["reason"] for entry in step["float_layers"])
    assert reasons == ["first compute layer (keep_first_last)", "last compute layer (keep_first_last)"]
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert compute[0].input[1] in floats and compute[-1].input[1] in floats


@pytest.mark.parametrize("params", [{"method": "dynamic_int8"}, {"method": "fp16"}, {"method": "weight_only", "bits": 4},
                                    {"method": "codebook"}, {"method": "qat"}])
def test_every_method_on_a_pytorch_upload(client, reference, tmp_path, params):
    model_id = upload_model(client, reference.pt2)["id"]
    data_id = upload_dataset(client, reference.eval_npz)["id"]
    job, _, path = run(client, (model_id, data_id), params, tmp_path, data={"eval": data_id, "train": data_id})
    assert job["metrics"]["model_format"] == "torch_export"
    runs_like_the_original(path, reference, 0.8)
