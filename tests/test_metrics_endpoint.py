"""Operations (issue #15 part 5): /metrics scraped before and after jobs run, its access rules,
request ids on every answer, and one request id found in both the API's and the worker's log
files of the production stack (API under uvicorn, a Celery worker, PostgreSQL, Redis, S3)."""

import json
import re
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.db import make_engine, make_session_factory
from service.migrate import upgrade
from service.unit_of_work import transaction
from service.tenants import service as tenants
from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.processes import wait_for
from tests.stack import production_stack
from worker.serve import create_app

def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """The exposition text as {(name, labels): value}, read by prometheus_client's own parser (a
    malformed text fails here, as it would fail a scraper)."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def wait_job(http, model_id: str, data_id: str, seconds: float, headers: dict | None = None) -> dict:
    response = http.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "wait", "params": {"seconds": seconds}}],
                                           "data": {"eval": data_id}}, headers=headers or {})
    assert response.status_code == 202, response.text
    return response.json()


@pytest.fixture
def embedded(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", plugins="tests.plugins")),
                    raise_server_exceptions=False) as client:
        yield client


def test_counters_move_as_requests_and_jobs_run(embedded, reference):
    http = embedded
    model = upload_model(http, reference.onnx)
    data = upload_dataset(http, reference.eval_npz)
    before = samples(http.get("/metrics").text)
    for _ in range(3):
        assert http.get("/v1/jobs/job_nope").status_code == 404
    job = wait_job(http, model["id"], data["id"], 0.3)
    finished, _ = wait_finished(http, job["id"], timeout=120)
    assert finished["status"] == "succeeded", finished["error"]
    after_response = http.get("/metrics")
    assert after_response.status_code == 200
    assert after_response.headers["content-type"].startswith("text/plain")
    after = samples(after_response.text)

    # By route template, never the raw path: three 404s on one series.
    route = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}
    assert value(after, "modelpress_http_requests_total", **route) - value(before, "modelpress_http_requests_total", **route) == 3
    assert not any("job_nope" in dict(labels).get("route", "") for _, labels in after)
    assert value(after, "modelpress_http_request_duration_seconds_count", **route) >= 3
    posted = {"method": "POST", "route": "/v1/jobs", "status": "202"}
    assert value(after, "modelpress_http_requests_total", **posted) == value(before, "modelpress_http_requests_total", **posted) + 1

    assert value(after, "modelpress_jobs", status="succeeded", queue="cpu") == value(before, "modelpress_jobs", status="succeeded", queue="cpu") + 1
    assert value(after, "modelpress_queue_depth", queue="cpu") == 0
    step = {"step_type": "wait", "method": "default"}
    assert value(after, "modelpress_step_duration_seconds_count", **step) == value(before, "modelpress_step_duration_seconds_count", **step) + 1
    assert value(after, "modelpress_step_duration_seconds_sum", **step) >= 0.3  # the step waited that long at least
    assert value(after, "modelpress_step_duration_seconds_bucket", le="+Inf", **step) == value(after, "modelpress_step_duration_seconds_count", **step)
    assert value(after, "modelpress_metrics_database_up") == 1
    # The step's seconds are in its metrics too.
    assert finished and http.get(f"/v1/jobs/{job['id']}").json()["metrics"]["steps"][0]["seconds"] >= 0.3


def test_failures_are_counted_by_error_code(tmp_path, reference):
    settings = Settings(data_dir=tmp_path / "data", plugins="tests.plugins", job_time_limit_s=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as http:
        model = upload_model(http, reference.onnx)
        data = upload_dataset(http, reference.eval_npz)
        before = samples(http.get("/metrics").text)
        job = wait_job(http, model["id"], data["id"], 120)  # can never finish within the 1 s limit
        finished, _ = wait_finished(http, job["id"], timeout=120)
        assert finished["error"]["code"] == "time_limit_exceeded"
        after = samples(http.get("/metrics").text)
    code = {"code": "time_limit_exceeded"}
    assert value(after, "modelpress_job_failures_total", **code) == value(before, "modelpress_job_failures_total", **code) + 1
    assert value(after, "modelpress_jobs", status="failed", queue="cpu") == 1


def test_request_id_is_taken_when_well_formed_and_made_otherwise(embedded):
    http = embedded
    given = http.get("/v1/jobs/job_x", headers={"X-Request-ID": "ci-run-42:step.3"})
    assert given.status_code == 404 and given.headers["x-request-id"] == "ci-run-42:step.3"
    for hostile in ("has space", "x" * 129, "semi;colon", ""):
        made = http.get("/healthz", headers={"X-Request-ID": hostile})
        assert made.headers["x-request-id"] != hostile and re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    # Answers made before any route runs (a guard's refusal, an unknown path) carry one too.
    assert re.fullmatch(r"[0-9a-f]{32}", http.get("/v1/jobs", params={"cursor": "a\x01b"}).headers["x-request-id"])
    assert http.get("/no/such/path").headers["x-request-id"]
    first, second = (http.get("/healthz").headers["x-request-id"] for _ in range(2))
    assert first != second


def test_request_id_is_stored_with_the_job(embedded, reference):
    http = embedded
    model = upload_model(http, reference.onnx)
    data = upload_dataset(http, reference.eval_npz)
    job = wait_job(http, model["id"], data["id"], 0.1, headers={"X-Request-ID": "req-stored-1"})
    assert job["request_id"] == "req-stored-1"
    assert http.get(f"/v1/jobs/{job['id']}").json()["request_id"] == "req-stored-1"
    wait_finished(http, job["id"], timeout=120)


def _operator_key(settings: Settings) -> tuple[str, str]:
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            ops = tenants.create_tenant(session=session, tenant_id=f"ops-{uuid.uuid4().hex[:6]}", operator=True)
            team = tenants.create_tenant(session=session, tenant_id=f"team-{uuid.uuid4().hex[:6]}")
            return (tenants.create_key(session=session, tenant_id=ops.id, scopes="admin").secret,
                    tenants.create_key(session=session, tenant_id=team.id, scopes="admin").secret)
    finally:
        engine.dispose()


def test_metrics_access_where_keys_are_required(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", auth="on", metrics_token="scrape-secret-1")
    settings.data_dir.mkdir(parents=True)
    operator_key, tenant_admin_key = _operator_key(settings)
    with TestClient(create_app(settings), raise_server_exceptions=False) as http:
        refused = http.get("/metrics")
        assert refused.status_code == 401 and refused.json()["code"] == "api_key_required"
        assert http.get("/metrics", headers={"Authorization": "Bearer scrape-secret-2"}).json()["code"] == "invalid_api_key"
        # A tenant's admin sees its own tenant only; the figures span them all.
        other = http.get("/metrics", headers={"Authorization": f"Bearer {tenant_admin_key}"})
        assert other.status_code == 403 and other.json()["code"] == "insufficient_scope"
        for secret in ("scrape-secret-1", operator_key):
            allowed = http.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
            assert allowed.status_code == 200 and "modelpress_jobs" in allowed.text


def test_json_log_lines_carry_the_request_id(capsys):
    import logging

    from service.ops import logs
    from service.ops.context import bound

    logs.configure("json")
    try:
        with bound(request_id="req-log-1", job_id="job_1"):
            logging.getLogger("modelpress.test").info("hello %s", "there")
        logging.getLogger("modelpress.test").warning("outside")
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False, "root": {"handlers": []}})
    first, second = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert (first["message"], first["request_id"], first["job_id"], first["level"]) == ("hello there", "req-log-1", "job_1", "INFO")
    assert second["request_id"] is None and "job_id" not in second


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_one_request_id_in_the_api_and_worker_logs_and_metrics_on_the_stack(tmp_path_factory, redis_url,
                                                                             s3_endpoint, reference):
    logs = tmp_path_factory.mktemp("ops-stack")
    with production_stack(logs, redis_url=redis_url, s3_endpoint=s3_endpoint,
                          bucket="modelpress-ops", extra_env={"MODELPRESS_LOG_FORMAT": "json"}) as (url, worker, api):
        with httpx.Client(base_url=url, timeout=30) as http:
            model = upload_model(http, reference.onnx)
            data = upload_dataset(http, reference.eval_npz)
            before = samples(http.get("/metrics").text)
            request_id = f"req-{uuid.uuid4().hex[:12]}"
            job = wait_job(http, model["id"], data["id"], 0.5, headers={"X-Request-ID": request_id})
            finished, _ = wait_finished(http, job["id"], timeout=180)
            assert finished["status"] == "succeeded", finished["error"]
            # Several API processes (one per core): any one's scrape sums their HTTP counters.
            after = samples(http.get("/metrics").text)
            wait_for(lambda: request_id in worker.log_path.read_text(errors="replace"), 30, "the worker's log line")

    posted = {"method": "POST", "route": "/v1/jobs", "status": "202"}
    assert value(after, "modelpress_http_requests_total", **posted) >= value(before, "modelpress_http_requests_total", **posted) + 1
    # The API processes shared their counters through prometheus_client's multiprocess files.
    assert list((logs / "data" / "prometheus").glob("counter_*.db"))
    assert value(after, "modelpress_jobs", status="succeeded", queue="cpu") >= value(before, "modelpress_jobs", status="succeeded", queue="cpu") + 1
    step = {"step_type": "wait", "method": "default"}
    assert value(after, "modelpress_step_duration_seconds_count", **step) >= value(before, "modelpress_step_duration_seconds_count", **step) + 1

    def lines_with_the_id(path):
        found = []
        for line in path.read_text(errors="replace").splitlines():
            if request_id in line:
                found.append(json.loads(line))  # every line that carries it is one JSON object
        return found

    api_lines, worker_lines = lines_with_the_id(api.log_path), lines_with_the_id(worker.log_path)
    assert any(entry["request_id"] == request_id and "POST /v1/jobs" in entry["message"] for entry in api_lines), api_lines
    assert any(entry["request_id"] == request_id and "accepted" in entry["message"] for entry in api_lines), api_lines
    assert any(entry["request_id"] == request_id and entry.get("job_id") == job["id"] and "claimed" in entry["message"]
               for entry in worker_lines), worker_lines
    assert any(entry["request_id"] == request_id and "succeeded" in entry["message"] for entry in worker_lines), worker_lines


def test_tracing_is_off_unless_configured_and_installed(caplog):
    from fastapi import FastAPI

    from service.ops.tracing import install_tracing

    app = FastAPI()
    assert install_tracing(app, endpoint="") is False and not caplog.records
    try:
        import opentelemetry.sdk  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    if installed:
        pytest.skip("the OpenTelemetry SDK is installed here: the off path is what this test checks")
    assert install_tracing(app, endpoint="http://127.0.0.1:4318/v1/traces") is False
    assert "OpenTelemetry is not installed" in caplog.text
    assert app.user_middleware == []  # nothing was added
