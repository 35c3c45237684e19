"""Live progress: GET /v1/jobs/{id}/events (Server-Sent Events) against a real server (uvicorn,
the embedded worker running real jobs), `client.wait()` over it, resuming with Last-Event-ID,
and the client's fallback to polling."""

import json
import threading

import httpx
import pytest

from modelpress import Client
from modelpress.sse import events
from service.db import make_engine, make_session_factory, utcnow
from service.jobs.tables import JobRow
from tests.processes import wait_for
from tests.stack import embedded_server
from tests.test_models_api import assert_problem

# Short stream lives and keep-alives, so one test sees a stream end and a reconnect; the plug-in
# `wait` step (tests/plugins.py) makes a job that runs long enough to watch.
SERVER_ENV = {"MODELPRESS_PLUGINS": "tests.plugins", "MODELPRESS_SSE_MAX_STREAM_S": "3",
              "MODELPRESS_SSE_KEEPALIVE_S": "0.5", "MODELPRESS_SSE_POLL_INTERVAL_S": "0.2"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("events") / "data"
    with embedded_server(data, SERVER_ENV) as (url, _):
        yield url


@pytest.fixture(scope="module")
def inputs(server, reference):
    with Client(server) as client:
        return client.upload_model(reference.onnx), client.upload_dataset(reference.calib_npz)


def read_stream(url: str, job_id: str, last_event_id: str | None = None) -> tuple[list[tuple], int]:
    """Every event of one connection as (id, event, data), and the keep-alive comments it had."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    got, comments = [], 0
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in events(response.iter_lines()):
            if event is None:
                comments += 1
            else:
                got.append((event.id, event.event, json.loads(event.data)))
    return got, comments


def stages_of(got: list[tuple]) -> list[str]:
    return [data["stage"] for _, kind, data in got if kind in ("status", "progress") and "stage" in data]


def test_client_wait_over_sse_sees_every_stage_of_a_real_job(server, inputs):
    model, calibration = inputs
    with Client(server) as client:
        requests = []
        client.http.event_hooks["request"].append(lambda r: requests.append((r.url.path, r.headers.get("last-event-id"))))
        job = client.submit(model, [{"type": "quantize", "params": {"method": "static_int8"}}],
                            data={"calibration": calibration})
        seen = []
        job.wait(timeout=300, on_update=lambda j: seen.append((j.status, j.stage, j.progress)))
    assert job.status == "succeeded" and job.artifacts["model.onnx"]["size_bytes"] > 0
    # The stream, not polling: streams (each ends after 3 s here; the client reconnects after the
    # last id it got), then one read of the full job after the result.
    streams = [last for path, last in requests if path == f"/v1/jobs/{job.id}/events"]
    assert streams[0] is None and all(last is not None for last in streams[1:])
    assert [int(last) for last in streams[1:]] == sorted(int(last) for last in streams[1:])
    assert [path for path, _ in requests].count(f"/v1/jobs/{job.id}") == 1
    replay, _ = read_stream(server, job.id)
    stored_stages = stages_of(replay)
    seen_stages = [stage for _, stage, _ in seen]
    # Every stage the job went through reached wait(), in order (the final read repeats the last).
    assert [s for i, s in enumerate(seen_stages) if i == 0 or s != seen_stages[i - 1]] == \
        [s for i, s in enumerate(stored_stages) if i == 0 or s != stored_stages[i - 1]]
    assert {"queued", "starting", "load", "0:quantize:start", "0:quantize:done", "store", "succeeded"} <= set(seen_stages)
    assert any(s.startswith("evaluate:") for s in seen_stages)
    assert [status for status, _, _ in seen][-1] == "succeeded"
    progress = [p for _, _, p in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0
    logs = [data["line"] for _, kind, data in replay if kind == "log"]
    assert logs[0] == "claimed by a worker (attempt 1)"
    assert "step 1/1: quantize (static_int8): started" in logs and "step 1/1: quantize (static_int8): done" in logs
    kinds = [kind for _, kind, _ in replay]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    assert replay[-1][2]["id"] == job.id and replay[-1][2]["status"] == "succeeded"


def test_last_event_id_resumes_without_repeats(server, inputs):
    model, calibration = inputs
    with Client(server) as client:
        job = client.submit(model, [{"type": "wait", "params": {"seconds": 8}}], data={"calibration": calibration})
    # The server ends each stream after 3 s (MODELPRESS_SSE_MAX_STREAM_S): the first connection
    # ends while the job still runs, and the next one continues after its last id.
    first, comments = read_stream(server, job.id)
    assert first and "result" not in [kind for _, kind, _ in first]
    assert comments > 0  # keep-alives while nothing happened
    rest = []
    last = first[-1][0]
    while not rest or rest[-1][1] != "result":
        more, _ = read_stream(server, job.id, last)
        rest += more
        last = more[-1][0] if more else last
    ids = [int(event_id) for event_id, _, _ in first + rest]
    # Increasing, no id twice (the result carries the last event's id, and comes once).
    assert ids[:-1] == sorted(set(ids[:-1])) and ids[-1] == ids[-2]
    whole, _ = read_stream(server, job.id)
    assert whole == first + rest
    # Resuming in the middle gives exactly the events after it; after the last, only the result.
    middle = len(whole) // 2
    assert read_stream(server, job.id, whole[middle][0])[0] == whole[middle + 1:]
    assert [kind for _, kind, _ in read_stream(server, job.id, whole[-1][0])[0]] == ["result"]
    assert_problem(httpx.get(f"{server}/v1/jobs/{job.id}/events", headers={"Last-Event-ID": "x1"}), 400,
                   "invalid_last_event_id")


class _OlderServer(httpx.HTTPTransport):
    """What the client meets on a server from before /events: 404 there, the rest unchanged."""

    def handle_request(self, request):
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"code": "not_found", "detail": "Not Found"},
                                  headers={"content-type": "application/problem+json"})
        return super().handle_request(request)


class _BreakingStream(httpx.HTTPTransport):
    """The event stream's connection drops after its first few lines (a proxy that cuts it)."""

    def handle_request(self, request):
        response = super().handle_request(request)
        if not request.url.path.endswith("/events"):
            return response
        upstream = response.stream

        class Cut(httpx.SyncByteStream):
            def __iter__(self):
                for index, chunk in enumerate(upstream):
                    yield chunk
                    if index >= 2:
                        raise httpx.ReadError("connection reset by the test")

            def close(self):
                upstream.close()

        return httpx.Response(response.status_code, headers=response.headers, stream=Cut(), extensions=response.extensions)


@pytest.mark.parametrize("transport", [_OlderServer, _BreakingStream])
def test_wait_falls_back_to_polling(server, inputs, transport):
    model, calibration = inputs
    with Client(server, transport=transport()) as client:
        requests = []
        client.http.event_hooks["request"].append(lambda r: requests.append(r.url.path))
        job = client.submit(model, [{"type": "wait", "params": {"seconds": 2}}], data={"calibration": calibration})
        seen = []
        job.wait(timeout=300, poll_interval=0.2, on_update=lambda j: seen.append(j.status))
    assert job.status == "succeeded" and seen[-1] == "succeeded"
    assert requests.count(f"/v1/jobs/{job.id}/events") == 1
    assert requests.count(f"/v1/jobs/{job.id}") >= 2  # polled until it finished


def _insert_job(settings, tenant_id: str, status: str) -> str:
    engine = make_engine(settings.effective_database_url)
    try:
        with make_session_factory(engine)() as session:
            job = JobRow(id=f"job_{tenant_id[:8]}{utcnow().microsecond}", tenant_id=tenant_id, model_id="mdl_x",
                         status=status, stage=status, progress=0.0, spec={"steps": [], "data": {}}, metrics={},
                         heartbeat_at=utcnow())
            session.add(job)
            session.commit()
            return job.id
    finally:
        engine.dispose()


def test_events_are_tenant_scoped(client, settings):
    other = _insert_job(settings, "someone-else", "succeeded")
    assert_problem(client.get(f"/v1/jobs/{other}/events"), 404, "job_not_found")
    # A job with no events (one from before events were recorded) still gets its result.
    own = _insert_job(settings, settings.default_tenant, "succeeded")
    response = client.get(f"/v1/jobs/{own}/events")
    got = [e for e in events(response.text.splitlines()) if e is not None]
    assert [(e.event, e.id) for e in got] == [("result", "0")] and json.loads(got[0].data)["id"] == own


def test_streams_per_process_are_bounded(tmp_path):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.jobs.states import JobStatus, transition
    from worker.serve import create_app

    settings = Settings(data_dir=tmp_path / "data", sse_max_streams=1, sse_poll_interval_s=0.1)
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        running = _insert_job(settings, settings.default_tenant, "running")
        answers = []
        first = threading.Thread(target=lambda: answers.append(client.get(f"/v1/jobs/{running}/events")))
        first.start()
        wait_for(lambda: getattr(app.state, "event_stream_slots", None) and app.state.event_stream_slots.open == 1,
                 60, "the first stream to open")
        refused = client.get(f"/v1/jobs/{running}/events")
        assert_problem(refused, 503, "too_many_event_streams")
        assert refused.headers["retry-after"]
        # The job ends: the first stream sends its result, ends, and gives its place back.
        engine = make_engine(settings.effective_database_url)
        with make_session_factory(engine)() as session:
            assert transition(session, running, JobStatus.RUNNING, JobStatus.FAILED, stage="failed")
            session.commit()
        engine.dispose()
        first.join(60)
        assert answers and answers[0].status_code == 200
        kinds = [e.event for e in events(answers[0].text.splitlines()) if e is not None]
        assert kinds == ["status", "result"]
        assert app.state.event_stream_slots.open == 0
        assert client.get(f"/v1/jobs/{running}/events").status_code == 200


def test_wait_over_sse_keeps_its_timeout(server, inputs):
    from modelpress import JobCancelled, WaitTimeout

    model, calibration = inputs
    with Client(server) as client:
        job = client.submit(model, [{"type": "wait", "params": {"seconds": 120}}], data={"calibration": calibration})
        try:
            with pytest.raises(WaitTimeout):
                job.wait(timeout=2, progress=False)
            assert job.status in ("queued", "running")  # what the stream had said by then
        finally:
            job.cancel()
        with pytest.raises(JobCancelled):
            job.wait(timeout=300, progress=False)
        assert job.status == "cancelled"
