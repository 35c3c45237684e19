"""PATCH /v1/models/{id}: a model's task changed or cleared after upload, checked as the upload's
`task` field is, write scope only, audited, with Idempotency-Key; jobs already accepted keep the
task they were accepted with. Through the API, the client and the CLI."""

import json

from tests.jobs_flow import upload_dataset, wait_finished
from tests.tenancy import add_tenant, bearer, keyed_client, keyed_settings
from tests.test_models_api import assert_problem, upload

EMBEDDING_FILLED = {"type": "embedding", "outputs": None, "top_k": 3}
FP16 = [{"type": "quantize", "params": {"method": "fp16"}}]


def test_a_models_task_is_set_changed_cleared_and_accepted_jobs_keep_theirs(client, reference):
    model = upload(client, reference.onnx.read_bytes(), "resnet.onnx").json()
    path = f"/v1/models/{model['id']}"
    changed = client.patch(path, json={"task": {"type": "embedding", "top_k": 3}})
    assert changed.status_code == 200, changed.text
    assert changed.json()["task"] == EMBEDDING_FILLED and client.get(path).json()["task"] == EMBEDDING_FILLED

    eval_id = upload_dataset(client, reference.eval_npz)["id"]
    accepted = client.post("/v1/jobs", json={"model_id": model["id"], "steps": FP16, "data": {"eval": eval_id}}).json()
    assert accepted["task"] == EMBEDDING_FILLED
    # Cleared after the job was accepted: the job still runs as the embedding it was accepted as.
    cleared = client.patch(path, json={"task": None})
    assert cleared.status_code == 200 and cleared.json()["task"] is None and client.get(path).json()["task"] is None
    job, _ = wait_finished(client, accepted["id"])
    assert job["task"] == EMBEDDING_FILLED and job["metrics"]["comparison"]["task"]["task"]["type"] == "embedding"
    # A job accepted now infers its task again (classification for this (N, 10) output).
    later = client.post("/v1/jobs", json={"model_id": model["id"], "steps": FP16, "data": {"eval": eval_id}}).json()
    assert later["task"] is None


def test_a_bad_task_is_refused_with_the_uploads_codes_and_changes_nothing(client, reference):
    model = upload(client, reference.onnx.read_bytes(), "resnet.onnx", task=json.dumps({"type": "classification"})).json()
    path = f"/v1/models/{model['id']}"
    for body, code in (({"task": {"type": "regression"}}, "invalid_task"),
                       ({"task": {"type": "ctc"}}, "task_does_not_fit_model"),  # CTC reads rank 3; this output is (N, 10)
                       ({"task": {"type": "keypoints", "layout": "points"}}, "task_does_not_fit_model")):
        assert "task" in assert_problem(client.patch(path, json=body), 422, code)["detail"]
    assert_problem(client.patch(path, json={}), 422, "validation_error")  # naming nothing to change is a mistake
    assert_problem(client.patch(path, json={"task": None, "name": "x"}), 422, "validation_error")
    assert client.get(path).json()["task"] == {"type": "classification", "outputs": None}
    assert_problem(client.patch("/v1/models/mdl_missing", json={"task": None}), 404, "model_not_found")


def test_patch_needs_the_write_scope_is_audited_and_replays_under_its_idempotency_key(tmp_path, reference):
    settings = keyed_settings(tmp_path)
    tenant = add_tenant(settings, "acme")
    with keyed_client(settings) as client:
        model = client.post(
            "/v1/models", files={"file": ("resnet.onnx", reference.onnx.read_bytes())}, headers=tenant.headers()).json()
        path = f"/v1/models/{model['id']}"
        read_only = client.patch(path, json={"task": {"type": "embedding"}}, headers=bearer(tenant.keys["read"]))
        assert read_only.status_code == 403, read_only.text
        keyed = {**tenant.headers(), "Idempotency-Key": "set-task-1"}
        first = client.patch(path, json={"task": {"type": "embedding"}}, headers=keyed)
        assert first.status_code == 200 and "idempotent-replayed" not in first.headers
        client.patch(path, json={"task": None}, headers=tenant.headers())  # another change in between
        again = client.patch(path, json={"task": {"type": "embedding"}}, headers=keyed)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        # The replay answered the first request's result and did not run again: the task stays cleared.
        assert again.json() == first.json() and client.get(path, headers=tenant.headers()).json()["task"] is None
        other_body = client.patch(path, json={"task": {"type": "generic"}}, headers=keyed)
        assert_problem(other_body, 409, "idempotency_key_reused")
        audit = client.get("/v1/admin/audit", headers=bearer(tenant.keys["admin"])).json()["items"]
        assert [e["action"] for e in audit if e["resource_id"] == model["id"]].count("model.task_changed") == 2


def test_the_client_and_cli_change_and_clear_a_models_task(tmp_path, reference, capsys):
    from modelpress.cli import main
    from modelpress.client import Client, ModelpressError
    from tests.stack import embedded_server

    with embedded_server(tmp_path / "data") as (url, _):
        with Client(url) as client:
            model = client.upload_model(reference.onnx)
            assert client.update_model(model.id, task="embedding").task == {"type": "embedding", "outputs": None, "top_k": 5}
            assert client.update_model(model.id, task={"type": "embedding", "top_k": 3}).task == EMBEDDING_FILLED
            assert client.update_model(model.id, task=None).task is None
            try:
                client.update_model(model.id, task="ctc")
                raise AssertionError("a task that does not fit was accepted")
            except ModelpressError as refused:
                assert refused.code == "task_does_not_fit_model"
        capsys.readouterr()
        assert main(["models", "set-task", model.id, "--task", json.dumps({"type": "embedding", "top_k": 3}), "--url", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["task"] == EMBEDDING_FILLED
        assert main(["models", "set-task", model.id, "--task", "null", "--url", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["task"] is None
        assert main(["models", "set-task", model.id, "--task", "ctc", "--url", url]) != 0
        assert "task_does_not_fit_model" in capsys.readouterr().err
