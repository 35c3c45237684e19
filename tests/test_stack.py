"""The production shape, really started: the API under uvicorn and a Celery worker process, both on
PostgreSQL, Redis and S3 (moto's server), configured by environment variables only."""

import pytest
from sqlalchemy import create_engine, inspect

from service.migrate import downgrade, upgrade
from tests.jobs_flow import check_quantized_job, submit, upload_dataset, upload_model, wait_finished
from tests.processes import wait_for
from tests.stack import own_worker, stack_client
from tests.test_models_api import assert_problem

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(request):
    with stack_client(request, "modelpress-stack") as (http, worker, api):
        yield http, worker, api


def test_ready_reports_every_dependency(stack):
    http, _, _ = stack
    body = http.get("/readyz").json()
    assert body["checks"] == {"database": "ok", "storage": "ok", "broker": "ok"}
    assert body["worker"] == "celery"


def test_static_int8_job_through_celery_postgres_and_s3(stack, reference, tmp_path):
    http, template, api = stack
    with own_worker(template, "worker-1") as worker:
        job = check_quantized_job(http, reference, tmp_path, reference.onnx)
    assert job["attempts"] == 1
    assert job["id"] in worker.output()
    # The job's rows are in PostgreSQL, its objects in the bucket: nothing in the local data folder.
    engine = create_engine(api.env["DATABASE_URL"])  # the stack's own database
    with engine.connect() as connection:
        assert connection.exec_driver_sql(f"SELECT status FROM jobs WHERE id = '{job['id']}'").scalar() == "succeeded"
        keys = [row[0] for row in connection.exec_driver_sql(f"SELECT storage_key FROM artifacts WHERE job_id = '{job['id']}'")]
    engine.dispose()
    assert keys and all(key.startswith(f"tenants/default/jobs/{job['id']}/") for key in keys)


def test_errors_on_the_stack(stack, reference):
    http, _, _ = stack
    assert_problem(http.get("/v1/jobs/job_missing"), 404, "job_not_found")
    assert_problem(http.post("/v1/models", files={"file": ("m.onnx", b"\x08\x07garbage")}), 422, "invalid_onnx")
    model = upload_model(http, reference.onnx)
    wrong = upload_dataset(http, reference.wrong_size_npz)
    response = http.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "quantize"}], "data": {"calibration": wrong["id"]}})
    assert_problem(response, 422, "dataset_shape_mismatch")


def test_job_queued_while_no_worker_runs_waits_and_then_runs(stack, reference):
    http, template, _ = stack
    model = upload_model(http, reference.onnx)
    data = upload_dataset(http, reference.calib_npz)
    template.stop()
    job = submit(http, model["id"], data["id"], None)
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    with own_worker(template, "worker-2"):
        finished, _ = wait_finished(http, job["id"])
        assert finished["status"] == "succeeded", finished["error"]


def _epoch(stage: str) -> int:
    return int(stage.split("epoch ")[1].split("/")[0]) if ":distill:epoch " in stage else 0


# Its waits: a worker start (120 s at most), training's start (120 s), a second worker (120 s), the job (600 s).
@pytest.mark.timeout(960)
def test_worker_killed_mid_job_is_taken_over_by_another_worker(stack, reference):
    """SIGKILL the whole worker inside a real training step (torch, mid-epoch): its heartbeat goes
    stale, the next worker's reaper re-queues the job, and it runs again to success (attempt 2),
    each epoch once, with no half-written artifact. (Resuming from a checkpoint further in:
    test_worker_killed_mid_training_resumes_from_its_checkpoint.)"""
    http, template, _ = stack
    with own_worker(template, "worker-3") as first:
        model = upload_model(http, reference.onnx)
        train = upload_dataset(http, reference.train_npz)
        steps = [{"type": "distill", "params": {"epochs": 2, "batch_size": 64}}]
        job = http.post("/v1/jobs", json={"model_id": model["id"], "steps": steps, "data": {"train": train["id"]},
                                          "floor": "off"}).json()
        wait_for(lambda: _epoch(http.get(f"/v1/jobs/{job['id']}").json()["stage"]) >= 1, 120, "training to start", interval=0.05)
        first.kill()
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    with own_worker(template, "worker-4"):
        finished, _ = wait_finished(http, job["id"])
        assert finished["status"] == "succeeded", finished["error"]
        assert finished["attempts"] == 2
        assert [entry["epoch"] for entry in finished["metrics"]["steps"][0]["training"]["history"]] == [1, 2]
        assert sorted(a["name"] for a in finished["artifacts"]) == ["metrics.json", "model.onnx", "recipe.json", "report.html"]


# Its waits: a worker start (120 s at most), the step's start (60 s), the cancel (120 s).
@pytest.mark.timeout(360)
def test_cancel_of_a_running_job_on_celery(stack, reference):
    """The API answers `cancelling` at once (the client and CLI show it); the Celery worker sees it
    at its next check and ends the job `cancelled`, with no artifacts, on its first attempt."""
    from modelpress.client import Client
    from modelpress.errors import JobCancelled

    http, template, _ = stack
    with own_worker(template, "worker-cancel"):
        model = upload_model(http, reference.onnx)
        data = upload_dataset(http, reference.calib_npz)
        job = http.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "wait", "params": {"seconds": 120}}],
                                           "data": {"eval": data["id"]}}).json()
        wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["stage"] == "0:wait:waiting", 60, "the step to start")
        client = Client(str(http.base_url))
        try:
            asked = client.job(job["id"]).cancel()
            assert asked.status == "cancelling"
            assert job["id"] in [j.id for j in client.jobs(status="cancelling")] or asked.refresh().status == "cancelled"
            with pytest.raises(JobCancelled):
                asked.wait(timeout=120, progress=False)
        finally:
            client.close()
        finished = http.get(f"/v1/jobs/{job['id']}").json()
        assert (finished["status"], finished["stage"], finished["attempts"], finished["artifacts"]) == ("cancelled", "cancelled", 1, [])
        assert_problem(http.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")


# Its waits: a worker start (120 s at most), 3 epochs (300 s), a second worker (120 s), the job (600 s).
@pytest.mark.timeout(1200)
def test_worker_killed_mid_training_resumes_from_its_checkpoint(stack, reference):
    """A prune -> distill recipe; SIGKILL the worker in the middle of training. The next worker
    takes the pruned model from storage (the prune step does not run again) and continues training
    from the last epoch checkpoint instead of starting over."""
    http, template, _ = stack
    with own_worker(template, "worker-5") as first:
        model = upload_model(http, reference.onnx)
        train = upload_dataset(http, reference.train_npz)
        steps = [{"type": "prune", "params": {"method": "channels", "ratio": 0.5, "round_to": 4}},
                 # Enough epochs left after the kill (9 or more) that it cannot finish first; few and
                 # large batches so a loaded machine still trains it in time.
                 {"type": "distill", "params": {"epochs": 12, "batch_size": 64}}]
        # The floor off: this is about resuming, not about how good 12 epochs make a half-pruned model.
        job = http.post("/v1/jobs", json={"model_id": model["id"], "steps": steps, "data": {"train": train["id"]},
                                          "floor": "off"}).json()
        wait_for(lambda: _epoch(http.get(f"/v1/jobs/{job['id']}").json()["stage"]) >= 3, 300, "training to pass epoch 2")
        first.kill()
    with own_worker(template, "worker-6"):
        finished, _ = wait_finished(http, job["id"])
        assert finished["status"] == "succeeded", finished["error"]
        assert finished["attempts"] == 2
        prune, distill = finished["metrics"]["steps"]
        assert prune.get("resumed") is True
        training = distill["training"]
        assert training["resumed_from_epoch"] >= 2
        assert [entry["epoch"] for entry in training["history"]] == list(range(1, 13))


def test_migrations_roundtrip_on_a_fresh_postgres_database():
    import uuid

    import psycopg

    from tests.conftest import PG_ADMIN_URL

    name = f"modelpress_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    try:
        upgrade(url)
        engine = create_engine(url)
        assert {"models", "datasets", "jobs", "artifacts"} <= set(inspect(engine).get_table_names())
        downgrade(url)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)
        engine.dispose()
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
