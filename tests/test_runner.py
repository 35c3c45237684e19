"""The runner's promises: a claim is exclusive, a dead delivery is taken over cleanly, cancel stops a
running job at its next progress check, and a step that overruns the time limit fails clearly."""

import time
from datetime import timedelta

import pytest

from service.db import make_engine, make_session_factory, utcnow
from service.jobs import runner_api
from service.jobs.runner_api import Heartbeat
from service.jobs.states import JobStatus
from service.jobs.tables import JobRow
from service.migrate import upgrade
from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.test_models_api import assert_problem


@pytest.fixture
def wait_step():
    """The test-only `wait` step (tests/plugins.py); yields the list of times it started."""
    from tests import plugins

    plugins.started.clear()
    return plugins.started


@pytest.fixture
def session_factory(settings):
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    return make_session_factory(make_engine(settings.effective_database_url))


def make_job(session_factory, status="queued", heartbeat_age_s=None) -> str:
    with session_factory() as session:
        job = JobRow(id=f"job_{time.monotonic_ns()}", tenant_id="default", model_id="mdl_x", status=status, stage=status,
                     progress=0.0, spec={"steps": [], "data": {}}, metrics={}, attempts=0,
                     heartbeat_at=None if heartbeat_age_s is None else utcnow() - timedelta(seconds=heartbeat_age_s))
        session.add(job)
        session.commit()
        return job.id


def claim(session_factory, job_id, stale_after_s=60, max_attempts=3):
    return runner_api.claim(sessions=session_factory, job_id=job_id, stale_after_s=stale_after_s, max_attempts=max_attempts)


def status_of(session_factory, job_id) -> str:
    with session_factory() as session:
        return session.get(JobRow, job_id).status


def test_claim_is_exclusive(session_factory):
    job_id = make_job(session_factory)
    first = claim(session_factory, job_id)
    second = claim(session_factory, job_id)
    assert first is not None and second is None


def test_stale_delivery_is_taken_over_and_the_old_one_is_ignored(session_factory):
    job_id = make_job(session_factory)
    old_token = claim(session_factory, job_id).token
    with session_factory() as session:
        session.get(JobRow, job_id).heartbeat_at = utcnow() - timedelta(seconds=120)
        session.commit()
    job = claim(session_factory, job_id)
    new_token = job.token
    assert job.attempts == 2 and new_token != old_token
    beat = dict(sessions=session_factory, job_id=job_id, stage="x", progress=0.5)
    assert runner_api.heartbeat(token=old_token, **beat) is Heartbeat.SUPERSEDED
    assert not runner_api.finish(sessions=session_factory, job_id=job_id, token=old_token, status=JobStatus.SUCCEEDED)
    assert runner_api.heartbeat(token=new_token, **beat) is Heartbeat.CONTINUE
    assert runner_api.finish(sessions=session_factory, job_id=job_id, token=new_token, status=JobStatus.SUCCEEDED)
    assert status_of(session_factory, job_id) == "succeeded"


def test_reaper_requeues_only_stale_jobs_and_gives_up_after_max_attempts(session_factory):
    stale = make_job(session_factory, status="running", heartbeat_age_s=600)
    fresh = make_job(session_factory, status="running", heartbeat_age_s=1)
    assert [job.id for job in runner_api.reap_stale(sessions=session_factory, stale_after_s=300)] == [stale]
    assert status_of(session_factory, fresh) == "running"
    with session_factory() as session:
        session.get(JobRow, stale).attempts = 3
        session.commit()
    assert claim(session_factory, stale, stale_after_s=300) is None
    with session_factory() as session:
        job = session.get(JobRow, stale)
        assert (job.status, job.error_code) == ("failed", "worker_lost")


def test_a_cancelling_job_whose_worker_died_ends_cancelled(session_factory):
    """Its cancel needs no worker: the reaper (or a re-delivery's claim) settles it, never re-runs it."""
    reaped = make_job(session_factory, status="cancelling", heartbeat_age_s=600)
    redelivered = make_job(session_factory, status="cancelling", heartbeat_age_s=600)
    alive = make_job(session_factory, status="cancelling", heartbeat_age_s=1)
    assert claim(session_factory, redelivered, stale_after_s=300) is None
    assert status_of(session_factory, redelivered) == "cancelled"
    assert claim(session_factory, alive, stale_after_s=300) is None
    # Nothing to dispatch again: a cancelled job is not re-queued.
    assert runner_api.reap_stale(sessions=session_factory, stale_after_s=300) == []
    assert status_of(session_factory, reaped) == "cancelled"
    assert status_of(session_factory, alive) == "cancelling"


def test_the_heartbeat_of_a_cancelling_job_says_cancel_and_it_records_nothing_more(session_factory):
    job_id = make_job(session_factory)
    token = claim(session_factory, job_id).token
    with session_factory() as session:
        session.get(JobRow, job_id).status = "cancelling"
        session.commit()
    assert runner_api.heartbeat(sessions=session_factory, job_id=job_id, token=token, stage="x", progress=0.1) is Heartbeat.CANCEL
    recorded = runner_api.record_artifact(sessions=session_factory, job_id=job_id, token=token, name="model.onnx",
                                          size_bytes=1, sha256="0" * 64, storage_key="k")
    assert recorded is Heartbeat.CANCEL
    with session_factory() as session:
        assert session.get(JobRow, job_id).artifacts == []
    assert runner_api.finish(sessions=session_factory, job_id=job_id, token=token, status=JobStatus.CANCELLED)
    assert status_of(session_factory, job_id) == "cancelled"
    assert runner_api.heartbeat(sessions=session_factory, job_id=job_id, token=token, stage="x", progress=0.1) is Heartbeat.SUPERSEDED


def test_finished_jobs_never_move(session_factory):
    job_id = make_job(session_factory, status="succeeded")
    assert claim(session_factory, job_id, stale_after_s=0) is None
    assert runner_api.reap_stale(sessions=session_factory, stale_after_s=0) == []
    assert status_of(session_factory, job_id) == "succeeded"


def test_cancel_stops_a_running_job(client, reference, wait_step):
    model = upload_model(client, reference.onnx)
    data = upload_dataset(client, reference.calib_npz)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "wait", "params": {"seconds": 600}}],
                                         "data": {"eval": data["id"]}}).json()
    deadline = time.monotonic() + 300
    while client.get(f"/v1/jobs/{job['id']}").json()["stage"] != "0:wait:waiting" and time.monotonic() < deadline:
        time.sleep(0.05)
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    # Running: the job is `cancelling` until its worker stops it; asking again changes nothing.
    assert response.status_code == 202 and response.json()["status"] == "cancelling"
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 202 and again.json()["status"] in {"cancelling", "cancelled"}
    # The step would wait 600 s: `cancelled` within this wait means the cancel cut it short.
    finished, _ = wait_finished(client, job["id"], timeout=180)
    assert finished["status"] == "cancelled"
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")


def test_time_limit_fails_the_job_with_a_clear_code(tmp_path, reference, wait_step):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path / "d", job_time_limit_s=2))) as client:
        model = upload_model(client, reference.onnx)
        data = upload_dataset(client, reference.calib_npz)
        job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "wait", "params": {"seconds": 600}}],
                                             "data": {"eval": data["id"]}}).json()
        finished, _ = wait_finished(client, job["id"], timeout=180)
    assert finished["status"] == "failed"
    assert finished["error"]["code"] == "time_limit_exceeded"


def test_embedded_restart_takes_up_interrupted_jobs(tmp_path, reference, wait_step):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app

    settings = Settings(data_dir=tmp_path / "d")
    with TestClient(create_app(settings)) as client:
        model = upload_model(client, reference.onnx)
        data = upload_dataset(client, reference.calib_npz)
        job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "wait", "params": {"seconds": 2}}],
                                             "data": {"eval": data["id"]}}).json()
        while not wait_step:
            time.sleep(0.05)
    # The process stopped mid-job; the job is left running, not failed and not lost.
    with TestClient(create_app(settings)) as client:
        finished, _ = wait_finished(client, job["id"], timeout=180)
        assert finished["status"] == "succeeded", finished["error"]
        assert finished["attempts"] == 2


def test_the_heartbeat_beats_several_times_within_the_stale_limit(tmp_path):
    """A step busy for longer than the stale limit between its own reports (a long epoch on a busy
    machine) must still look alive: the heartbeat thread alone keeps it fresh."""
    from types import SimpleNamespace

    from service.config import Settings
    from worker.runner.lifecycle import HEARTBEAT_S, Progress

    for stale in (5, 10, 300):
        progress = Progress(SimpleNamespace(settings=Settings(data_dir=tmp_path, stale_job_after_s=stale)), "job_x", "token")
        assert progress.beat_s <= stale / 3 and progress.beat_s <= HEARTBEAT_S


def test_the_stage_clock_adds_up_each_stage_and_groups_the_phases(monkeypatch):
    from worker.runner import lifecycle

    now = [100.0]
    monkeypatch.setattr(lifecycle.time, "monotonic", lambda: now[0])
    clock = lifecycle.StageClock()
    for stage, spent in (("load", 1.0), ("0:quantize:calibrate", 2.0), ("0:quantize:inspect", 0.5),
                         ("0:quantize:calibrate", 1.0), ("1:prune:start", 0.25), ("evaluate:original", 3.0)):
        clock.enter(stage)
        now[0] += spent
    # A stage entered twice is added up; the stage running now counts up to now.
    assert clock.under("0:quantize:") == {"calibrate": 3.0, "inspect": 0.5}
    assert clock.phases() == {"load": 1.0, "steps": 3.75, "evaluate": 3.0}
    monkeypatch.setattr(lifecycle.StageClock, "MAX_STAGES", 2)
    bounded = lifecycle.StageClock()
    for stage in ("a", "b", "c", "d", "a"):
        bounded.enter(stage)
        now[0] += 1.0
    assert bounded.under("") == {"a": 2.0, "b": 1.0, "other": 2.0}
