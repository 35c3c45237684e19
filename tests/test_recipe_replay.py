"""recipe.json holds what a job decided by measurement (activation type, the guard's calibration and
float layers, the ratio found for a MAC target), so posting it back gives the same model bytes,
also when the machine is busy and timing would decide otherwise."""

import json

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.processes import cpu_load
from worker.recipe import decided_steps


def test_decided_values_replace_the_questions():
    steps = [{"type": "prune", "params": {"method": "channels", "ratio": None, "target_macs": 0.5, "target_params": None}},
             {"type": "quantize", "params": {"method": "static_int8", "activation_type": "auto", "calibration": "minmax",
                                             "exclude": ["Gemm"], "guard": {"max_accuracy_drop": 0.01}}}]
    measured = [{"type": "prune", "ratio_found": 0.3125},
                {"type": "quantize", "activation_type": "uint8",
                 "guard": {"met": True, "calibration": "entropy", "kept_float": [{"layer": "conv_1"}, {"layer": "Gemm"}]}}]
    decided, decisions = decided_steps(steps, measured)
    assert decided[0]["params"] == {"method": "channels", "ratio": 0.3125, "target_macs": None, "target_params": None}
    quantize = decided[1]["params"]
    assert (quantize["activation_type"], quantize["calibration"], quantize["exclude"]) == ("uint8", "entropy", ["Gemm", "conv_1"])
    assert quantize["guard"] == {"max_accuracy_drop": 0.01}  # the promise is still checked on replay
    assert {(d["step"], d["param"]) for d in decisions} == {(0, "ratio"), (1, "activation_type"), (1, "calibration"), (1, "exclude")}
    assert steps[1]["params"]["activation_type"] == "auto"  # the job's own spec is left as asked


def test_a_guard_that_was_not_met_decides_nothing_about_calibration():
    steps = [{"type": "quantize", "params": {"activation_type": "int8", "calibration": "minmax", "exclude": []}}]
    decided, decisions = decided_steps(steps, [{"activation_type": "int8", "guard": {"met": False, "calibration": "entropy", "kept_float": []}}])
    assert decided == steps and decisions == []


def test_recipe_replayed_under_load_gives_the_same_model_bytes(client, reference, tmp_path):
    model = upload_model(client, reference.onnx)["id"]
    data = {"calibration": upload_dataset(client, reference.calib_npz)["id"], "eval": upload_dataset(client, reference.eval_npz)["id"]}
    steps = [{"type": "prune", "params": {"method": "channels", "target_macs": 0.6, "round_to": 4}},
             {"type": "quantize", "params": {"method": "static_int8", "activation_type": "auto"}}]
    # Pruning without finetuning breaks the model (the floor would fail the job); this test is
    # about the same bytes again, and the recipe carries "floor": "off" to the replay.
    response = client.post("/v1/jobs", json={"model_id": model, "steps": steps, "data": data, "floor": "off"})
    job, _ = wait_finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    recipe = json.loads(client.get(f"/v1/jobs/{job['id']}/artifacts/recipe.json").content)
    prune, quantize = (step["params"] for step in recipe["steps"])
    assert prune["target_macs"] is None and 0 < prune["ratio"] < 1
    assert quantize["activation_type"] == job["metrics"]["steps"][1]["activation_type"] in ("uint8", "int8")
    assert {d["param"] for d in recipe["provenance"]["decided"]} == {"ratio", "activation_type"}
    assert recipe["floor"] == "off" and recipe["task"]["type"] == "classification"

    with cpu_load(tmp_path):
        again, _ = wait_finished(client, client.post("/v1/jobs", json=recipe).json()["id"])
    assert again["status"] == "succeeded", again["error"]
    sha = {j["id"]: next(a["sha256"] for a in j["artifacts"] if a["name"] == "model.onnx") for j in (job, again)}
    assert sha[job["id"]] == sha[again["id"]]
