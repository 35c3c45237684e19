"""Worker SIGKILLs at more points of a 2-step job, on the production shape (Celery, PostgreSQL,
Redis, S3): the whole worker during the final evaluation, and only its pool child during the second
step (the parent lives on and re-delivers). Each time: the job ends `succeeded` once, on its
second attempt, its finished first step taken from storage, and every artifact matches its digest.
The points before (mid-step, mid-training) are in test_stack.py."""

import hashlib
import os
import signal
from pathlib import Path

import pytest

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.processes import wait_for
from tests.stack import own_worker, stack_client

pytestmark = pytest.mark.integration

ARTIFACTS = {"model.onnx", "metrics.json", "report.html", "recipe.json"}


@pytest.fixture(scope="module")
def stack(request):
    with stack_client(request, "modelpress-faults") as (http, worker, _):
        yield http, worker


def two_waits(http, reference, second_s: float, eval_npz=None) -> dict:
    model = upload_model(http, reference.onnx)
    data = upload_dataset(http, eval_npz or reference.calib_npz)
    steps = [{"type": "wait", "params": {"seconds": 1}}, {"type": "wait", "params": {"seconds": second_s}}]
    response = http.post("/v1/jobs", json={"model_id": model["id"], "steps": steps, "data": {"eval": data["id"]}})
    assert response.status_code == 202, response.text
    return response.json()


def stage(http, job_id) -> str:
    return http.get(f"/v1/jobs/{job_id}").json()["stage"]


def _evaluating_or_done(http, job_id) -> bool:
    job = http.get(f"/v1/jobs/{job_id}").json()
    return job["stage"].startswith("evaluate:") or job["status"] in ("succeeded", "failed", "cancelled")


def assert_done_once_and_whole(http, job_id):
    # The reaper looks every 10 s at heartbeats older than 10 s (the stack's stale limit).
    finished, _ = wait_finished(http, job_id, timeout=120)
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["attempts"] == 2
    first, second = finished["metrics"]["steps"]
    assert first.get("resumed") is True  # finished before the kill: taken from its checkpoint
    assert not second.get("resumed")  # the last step keeps no checkpoint: it ran again
    names = [a["name"] for a in finished["artifacts"]]
    assert sorted(names) == sorted(ARTIFACTS)  # each once
    for artifact in finished["artifacts"]:
        body = http.get(artifact["url"])
        assert body.status_code == 200
        assert hashlib.sha256(body.content).hexdigest() == artifact["sha256"]


def pool_children(parent_pid: int) -> list[int]:
    children = Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split()
    return [int(pid) for pid in children]


# Its waits: a worker start (120 s at most), the evaluation (120 s), a second worker (120 s), the job (120 s).
@pytest.mark.timeout(540)
def test_worker_killed_during_the_final_evaluation_of_a_two_step_job(stack, reference):
    http, template = stack
    with own_worker(template, "faults-1") as first:
        # The evaluation must last long enough to be seen: on an idle machine the 200 calibration
        # images are measured in well under a poll. The 1,437 training images make it several
        # times longer, and the poll is fast (a missed window fails on the job finishing first).
        job = two_waits(http, reference, second_s=1, eval_npz=reference.train_npz)
        wait_for(lambda: _evaluating_or_done(http, job["id"]), 120, "the evaluation to start", interval=0.02)
        assert stage(http, job["id"]).startswith("evaluate:"), "the job finished before its evaluation was seen"
        first.kill()
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    with own_worker(template, "faults-2"):
        assert_done_once_and_whole(http, job["id"])


@pytest.mark.timeout(480)
def test_pool_child_killed_in_the_second_step_is_redelivered_by_its_parent(stack, reference):
    http, template = stack
    with own_worker(template, "faults-3") as worker:
        job = two_waits(http, reference, second_s=4)
        wait_for(lambda: stage(http, job["id"]) == "1:wait:waiting", 120, "the second step to start")
        children = pool_children(worker.proc.pid)
        assert len(children) == 1  # --concurrency 1: the one child running the job
        os.kill(children[0], signal.SIGKILL)
        # The parent starts a new child and gets the job back (reject_on_worker_lost): same worker.
        assert_done_once_and_whole(http, job["id"])
        assert worker.alive()
