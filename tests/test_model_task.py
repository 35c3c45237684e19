"""The task given at upload: checked as a job's is, stored on the model, used by the model's jobs
that give none (a job's own task overrides it), through the API, the client and the CLI."""

import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from tests.jobs_flow import upload_dataset, wait_finished
from tests.test_models_api import assert_problem, upload

# An embedding task on the (N, 10) classifier fits (misfit lets any rank through) and is never
# what inference picks for it (classification): a job judged as embedding took the model's task.
EMBEDDING = {"type": "embedding", "top_k": 3}
EMBEDDING_FILLED = {"type": "embedding", "outputs": None, "top_k": 3}
FP16 = [{"type": "quantize", "params": {"method": "fp16"}}]


def upload_with_task(client, reference, task_text: str):
    return upload(client, reference.onnx.read_bytes(), "resnet.onnx", task=task_text)


def run(client, model_id: str, eval_id: str, **fields) -> tuple[dict, dict]:
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": FP16, "data": {"eval": eval_id}, **fields})
    assert response.status_code == 202, response.text
    job, _ = wait_finished(client, response.json()["id"])
    return response.json(), job


def test_a_task_given_at_upload_is_shown_on_the_model_with_its_defaults(client, reference):
    response = upload_with_task(client, reference, json.dumps(EMBEDDING))
    assert response.status_code == 201, response.text
    assert response.json()["task"] == EMBEDDING_FILLED
    assert client.get(f"/v1/models/{response.json()['id']}").json()["task"] == EMBEDDING_FILLED
    plain = upload(client, reference.onnx.read_bytes(), "resnet.onnx")
    assert plain.status_code == 201 and plain.json()["task"] is None
    assert client.get(f"/v1/models/{plain.json()['id']}").json()["task"] is None


def test_a_job_without_its_own_task_uses_the_models_and_its_own_overrides_it(client, reference):
    model = upload_with_task(client, reference, json.dumps(EMBEDDING)).json()
    eval_id = upload_dataset(client, reference.eval_npz)["id"]

    accepted, job = run(client, model["id"], eval_id)
    assert accepted["task"] == EMBEDDING_FILLED
    task = job["metrics"]["comparison"]["task"]
    assert task["inferred"] is False and task["task"]["type"] == "embedding" and task["task"]["top_k"] == 3

    accepted, job = run(client, model["id"], eval_id, task={"type": "classification"})
    assert accepted["task"] == {"type": "classification", "outputs": None}
    task = job["metrics"]["comparison"]["task"]
    assert task["inferred"] is False and task["task"]["type"] == "classification"
    # The model keeps its task: the override was the job's alone.
    assert client.get(f"/v1/models/{model['id']}").json()["task"] == EMBEDDING_FILLED


@pytest.mark.parametrize("text, code", [
    ("{not json", "invalid_task"),
    ('"classification"', "invalid_task"),  # JSON, but not a task object
    ('{"type": "regression"}', "invalid_task"),
    ('{"type": "detection", "confidence": 2}', "invalid_task"),
    ('{"type": "ctc"}', "task_does_not_fit_model"),  # CTC reads a rank-3 output; this one is (N, 10)
    ('{"type": "classification", "outputs": [1]}', "task_does_not_fit_model"),
    ("x" * (16 * 1024 + 1), "field_too_long"),
])
def test_a_bad_task_at_upload_is_refused_with_its_code_and_stores_nothing(client, reference, text, code):
    body = assert_problem(upload_with_task(client, reference, text), 422, code)
    assert "task" in body["detail"]
    assert client.get("/v1/models").json()["items"] == []


def test_the_client_and_cli_give_a_task_at_upload_in_one_request_and_in_parts(tmp_path, reference, capsys):
    from modelpress.cli import main
    from modelpress.client import Client, ModelpressError
    from tests.stack import embedded_server

    with embedded_server(tmp_path / "data") as (url, _):
        with Client(url) as client:
            assert client.upload_model(reference.onnx, task="embedding").task == {"type": "embedding", "outputs": None, "top_k": 5}
            assert client.upload_model(reference.onnx, task=EMBEDDING).task == EMBEDDING_FILLED
            assert client.upload_model(reference.onnx).task is None
        # Over the threshold the file goes through an upload session: the task travels with it.
        with Client(url, upload_session_threshold=0) as client:
            assert client.upload_model(reference.onnx, task=EMBEDDING).task == EMBEDDING_FILLED
            with pytest.raises(ModelpressError) as refused:
                client.upload_model(reference.onnx, task="ctc")
            assert refused.value.code == "task_does_not_fit_model"
        capsys.readouterr()
        assert main(["models", "upload", str(reference.onnx), "--task", json.dumps(EMBEDDING), "--url", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["task"] == EMBEDDING_FILLED


def test_the_model_task_migration_applies_on_postgresql_and_matches_the_table():
    import service.models.tables  # noqa: F401
    from service.db import Base
    from service.migrate import downgrade, upgrade
    from tests.conftest import PG_ADMIN_URL
    from tests.tenancy import fresh_postgres_database

    url, drop = fresh_postgres_database(PG_ADMIN_URL)
    try:
        upgrade(url, "0011_cancelling")
        engine = create_engine(url)
        assert "task" not in {c["name"] for c in inspect(engine).get_columns("models")}
        upgrade(url)
        assert "task" in {c["name"] for c in inspect(engine).get_columns("models")}
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert [d for d in diff if "models" in repr(d)] == []
        downgrade(url, "0011_cancelling")
        assert "task" not in {c["name"] for c in inspect(engine).get_columns("models")}
        engine.dispose()
    finally:
        drop()
