"""The accuracy guard, both ways: met (also by keeping the most sensitive layers float), and not met
-> `guard_not_met` with the best candidate still downloadable. Checked on held-out data."""

import onnx
import pytest

from tests.jobs_flow import upload_dataset, upload_model, wait_finished, weight_bytes
from tests.test_models_api import assert_problem


@pytest.fixture
def ids(client, reference):
    return (upload_model(client, reference.onnx)["id"], upload_dataset(client, reference.eval_npz)["id"],
            upload_dataset(client, reference.calib_npz)["id"])


def post(client, model_id, params, data):
    return client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "quantize", "params": params}], "data": data})


def test_guard_met_is_checked_on_held_out_data(client, ids):
    model_id, eval_id, calib_id = ids
    response = post(client, model_id, {"method": "static_int8", "guard": {"max_accuracy_drop": 0.02}},
                    {"calibration": calib_id, "eval": eval_id})
    job, _ = wait_finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    guard = job["metrics"]["steps"][0]["guard"]
    assert guard["met"] is True and guard["holdout_samples"] == 180 and guard["tune_samples"] == 180
    drop = guard["original_holdout"]["accuracy"] - guard["candidate_holdout"]["accuracy"]
    assert drop <= 0.02


def test_mixed_precision_keeps_the_most_sensitive_layers_float(client, ids):
    model_id, eval_id, _ = ids
    response = post(client, model_id, {"method": "codebook", "bits": 2, "guard": {"min_top1_agreement": 0.985}}, {"eval": eval_id})
    job, _ = wait_finished(client, response.json()["id"], timeout=300)
    guard = job["metrics"]["steps"][0]["guard"]
    assert guard["attempts"][0]["meets_on_tune"] is False  # all layers at 2 bits is not enough
    assert guard["kept_float"], guard["attempts"]
    assert all(entry["reason"].startswith("sensitive: SQNR") for entry in guard["kept_float"])
    quantized = job["metrics"]["steps"][0]["quantized_layers"]
    assert quantized, "a model with every layer float is not a quantized model"
    if job["status"] == "succeeded":
        assert guard["met"] and guard["candidate_holdout"]["top1_agreement"] >= 0.985
    else:
        assert job["error"]["code"] == "guard_not_met"


def test_guard_not_met_fails_with_the_best_candidate_downloadable(client, ids, reference):
    model_id, eval_id, calib_id = ids
    # A promise no candidate keeps (100% on held-out data); a short budget, since every attempt fails.
    response = post(client, model_id, {"method": "static_int8", "guard": {"min_accuracy": 1.0, "budget_s": 5}},
                    {"calibration": calib_id, "eval": eval_id})
    job, _ = wait_finished(client, response.json()["id"], timeout=300)
    assert job["status"] == "failed" and job["error"]["code"] == "guard_not_met"
    guard = job["metrics"]["steps"][0]["guard"]
    # Beside the best candidate, the other candidates of the Pareto set, each by the name it lists.
    others = {entry["artifact"] for entry in guard["pareto"]} - {None, "model.onnx"}
    assert {a["name"] for a in job["artifacts"]} == {"model.onnx", "metrics.json", "report.html", "recipe.json", *others}
    assert [entry["artifact"] for entry in guard["pareto"]].count("model.onnx") == 1
    assert guard["met"] is False
    download = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx")
    assert download.status_code == 200
    # The best candidate is a real int8 model, judged from its file: int8 weights, fewer weight bytes
    # than the float original (a "quantize nothing" candidate has none and as many).
    original = weight_bytes(onnx.load(str(reference.onnx)).graph)
    candidate = weight_bytes(onnx.load_from_string(download.content).graph)
    assert candidate.get(onnx.TensorProto.INT8, 0) > 0
    assert sum(candidate.values()) < 0.9 * sum(original.values()), (candidate, original)


def test_guard_needs_evaluation_data_with_labels(client, ids):
    model_id, _, calib_id = ids
    assert_problem(post(client, model_id, {"guard": {"max_accuracy_drop": 0.01}}, {"calibration": calib_id}), 422, "eval_data_required")
    assert_problem(post(client, model_id, {"guard": {"max_accuracy_drop": 0.01}}, {"calibration": calib_id, "eval": calib_id}),
                   422, "eval_labels_required")
    assert_problem(post(client, model_id, {"guard": {"max_accuracy_drop": 0.01, "min_accuracy": 0.9}},
                        {"calibration": calib_id, "eval": calib_id}), 422, "invalid_step_params")
    label_free = post(client, model_id, {"guard": {"min_top1_agreement": 0.9}}, {"calibration": calib_id, "eval": calib_id})
    job, _ = wait_finished(client, label_free.json()["id"])
    assert job["status"] == "succeeded", job["error"]
