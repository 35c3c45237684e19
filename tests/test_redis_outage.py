"""A Redis outage on the production shape (API under uvicorn, a Celery worker, PostgreSQL, S3), with
a Redis of the test's own that it stops and starts again: while it is down the API answers what it
can (reads from PostgreSQL) and 503 with a code for what it cannot (queueing), never a 500; a job
running when Redis goes away finishes once; and when Redis is back the same worker takes new jobs."""

import httpx
import pytest

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.processes import Process, free_port, wait_for
from tests.stack import stack_client
from tests.test_models_api import assert_problem

pytestmark = pytest.mark.integration


class OwnRedis:
    """redis-server on a port of its own, nothing kept on disk (as the machine's Redis): a restart
    loses every message, which is the worst case for the jobs it carried."""

    def __init__(self, logs):
        self.port, self.logs, self.process, self.runs = free_port(), logs, None, 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.runs += 1
        self.process = Process(f"redis-{self.runs}", ["redis-server", "--port", str(self.port), "--save", "",
                                                      "--appendonly", "no", "--bind", "127.0.0.1"], {}, self.logs)
        wait_for(lambda: "Ready to accept connections" in self.process.output() or not self.process.alive(),
                 30, "redis-server")
        assert self.process.alive(), self.process.output()

    def stop(self) -> None:
        self.process.kill()


@pytest.fixture(scope="module")
def outage(request, tmp_path_factory):
    redis = OwnRedis(tmp_path_factory.mktemp("redis-outage"))
    redis.start()
    try:
        with stack_client(request, "modelpress-redis-outage", redis_url=redis.url) as (http, worker, _):
            yield http, redis, worker
    finally:
        if redis.process.alive():
            redis.stop()


def post_wait_job(http, reference, seconds: float) -> httpx.Response:
    model = upload_model(http, reference.onnx)
    data = upload_dataset(http, reference.calib_npz)
    return http.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "wait", "params": {"seconds": seconds}}],
                                       "data": {"eval": data["id"]}})


def running(http, job_id) -> bool:
    return http.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


# Its waits: the job starting (120 s), the outage (bounded by the job's own 10 s), the job (300 s), a new job (300 s).
@pytest.mark.timeout(840)
def test_a_redis_outage_answers_503_keeps_the_running_job_and_heals(outage, reference):
    http, redis, worker = outage
    response = post_wait_job(http, reference, seconds=10)
    assert response.status_code == 202, response.text
    job = response.json()
    wait_for(lambda: running(http, job["id"]), 120, "the job to start")

    redis.stop()
    try:
        # Reads come from PostgreSQL and storage: they still work.
        assert http.get(f"/v1/jobs/{job['id']}").status_code == 200
        assert http.get("/v1/jobs").status_code == 200
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert_problem(ready, 503, "not_ready")
        assert ready.json()["checks"]["broker"].startswith("error")
        # Queueing cannot: a clear 503, the job stored as failed with the same code, its upload kept.
        earlier = {j["id"] for j in http.get("/v1/jobs").json()["items"]}  # `make soak` runs this test again on one stack
        refused = post_wait_job(http, reference, seconds=1)
        assert_problem(refused, 503, "broker_unavailable")
        refused_jobs = [j for j in http.get("/v1/jobs").json()["items"]
                        if j["id"] not in earlier and j["error"] and j["error"]["code"] == "broker_unavailable"]
        assert len(refused_jobs) == 1 and refused_jobs[0]["status"] == "failed"
        assert http.get(f"/v1/models/{refused_jobs[0]['model_id']}").status_code == 200
        # The running job carries on: its state lives in PostgreSQL, not in the broker.
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] in ("running", "succeeded")
    finally:
        redis.start()

    finished, _ = wait_finished(http, job["id"], timeout=300)
    assert finished["status"] == "succeeded", (finished["error"], worker.output())
    assert finished["attempts"] == 1  # finished once, by the worker that had it
    for artifact in finished["artifacts"]:
        assert http.get(artifact["url"]).status_code == 200

    # The worker reconnected on its own: a job sent after the outage runs.
    after = post_wait_job(http, reference, seconds=1)
    assert after.status_code == 202, after.text
    done, _ = wait_finished(http, after.json()["id"], timeout=300)
    assert done["status"] == "succeeded", (done["error"], worker.output())
    assert worker.alive(), worker.output()
