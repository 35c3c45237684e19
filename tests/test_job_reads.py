"""Job reads: the list's summary shape, one query per page, ETag / If-None-Match on job reads, and
the client and CLI using both. Jobs that must stay `queued` are sent to a real Redis broker that no
worker consumes; jobs that must finish run on the embedded default."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from modelpress import Client
from service.config import Settings
from service.jobs.schemas import JobSummary
from worker.serve import create_app
from service.migrate import upgrade
from tests.jobs_flow import submit, upload_dataset, upload_model, wait_finished
from tests.stack import embedded_server

SUMMARY_FIELDS = set(JobSummary.model_fields)
CLI = str(Path(sys.executable).parent / "modelpress")


@pytest.fixture
def queued_client(tmp_path, redis_url):
    """An API whose jobs stay queued: the broker is real, but no worker listens."""
    settings = Settings(data_dir=tmp_path, broker_url=redis_url, auth="off",
                        broker_key_prefix=f"reads-{uuid.uuid4().hex[:8]}:")  # keys are tested in test_api_keys.py
    upgrade(settings.effective_database_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _queued_jobs(client, reference, count: int) -> list[dict]:
    model = upload_model(client, reference.onnx)
    data = upload_dataset(client, reference.calib_npz)
    return [submit(client, model["id"], data["id"], None) for _ in range(count)]


def test_list_items_are_summaries_and_view_full_gives_whole_jobs(queued_client, reference):
    jobs = _queued_jobs(queued_client, reference, 3)
    page = queued_client.get("/v1/jobs", params={"limit": 2}).json()
    assert [item["id"] for item in page["items"]] == [jobs[2]["id"], jobs[1]["id"]]
    for item in page["items"]:
        assert set(item) == SUMMARY_FIELDS
        assert (item["status"], item["stage"], item["progress"], item["headline"]) == ("queued", "queued", 0.0, None)
    rest = queued_client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [item["id"] for item in rest["items"]] == [jobs[0]["id"]] and rest["next_cursor"] is None

    full = queued_client.get("/v1/jobs", params={"view": "full", "status": "queued"}).json()["items"]
    assert full == [queued_client.get(f"/v1/jobs/{job['id']}").json() for job in reversed(jobs)]
    assert {"metrics", "steps", "artifacts"} <= set(full[0])
    response = queued_client.get("/v1/jobs", params={"view": "everything"})
    assert response.status_code == 422 and response.json()["code"] == "validation_error"


def test_the_summary_is_documented_in_the_openapi_spec(queued_client):
    spec = queued_client.get("/openapi.json").json()
    listed = spec["paths"]["/v1/jobs"]["get"]
    assert {p["name"] for p in listed["parameters"]} >= {"view", "limit", "cursor", "status"}
    summary = spec["components"]["schemas"]["JobSummary"]
    assert set(summary["properties"]) == SUMMARY_FIELDS and "metrics" not in summary["properties"]
    assert "304" in spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert "/v1/jobs/{job_id}/metrics" in spec["paths"]


def test_a_list_page_and_a_job_read_are_one_query_each(queued_client, reference):
    engine = queued_client.app.state.context.session_factory.kw["bind"]
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    def queries_for(url: str) -> int:
        statements.clear()
        event.listen(engine, "before_cursor_execute", record)
        try:
            assert queued_client.get(url).status_code == 200
        finally:
            event.remove(engine, "before_cursor_execute", record)
        return len(statements)

    [job] = _queued_jobs(queued_client, reference, 1)
    one = queries_for("/v1/jobs?limit=50")
    _queued_jobs(queued_client, reference, 6)
    listed = queries_for("/v1/jobs?limit=50")
    tenant_reads = sum("FROM tenants" in q for q in statements)
    # The page is one query however many rows; the caller's tenant (its rate limit) is read once.
    assert listed == one == 1 + tenant_reads and tenant_reads <= 1
    read = queries_for(f"/v1/jobs/{job['id']}")
    assert read == 1 + sum("FROM tenants" in q for q in statements) <= 2


def test_job_reads_answer_304_until_the_job_changes(queued_client, reference):
    [job] = _queued_jobs(queued_client, reference, 1)
    url = f"/v1/jobs/{job['id']}"
    first = queued_client.get(url)
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"') and first.json()["status"] == "queued"

    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = queued_client.get(url, headers={"If-None-Match": sent})
        assert again.status_code == 304, sent
        assert again.content == b"" and again.headers["etag"] == etag
    assert queued_client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    assert queued_client.post(f"{url}/cancel").json()["status"] == "cancelled"
    changed = queued_client.get(url, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag

    metrics = queued_client.get(f"{url}/metrics")
    assert metrics.status_code == 200 and metrics.json() == {}
    assert queued_client.get(f"{url}/metrics", headers={"If-None-Match": metrics.headers["etag"]}).status_code == 304
    missing = queued_client.get("/v1/jobs/job_nope", headers={"If-None-Match": "*"})
    assert missing.status_code == 404 and missing.json()["code"] == "job_not_found"


def test_a_finished_job_has_its_headline_in_the_list(client, reference):
    model = upload_model(client, reference.onnx)
    calibration, evaluation = upload_dataset(client, reference.calib_npz), upload_dataset(client, reference.eval_npz)
    finished, _ = wait_finished(client, submit(client, model["id"], calibration["id"], evaluation["id"])["id"])
    assert finished["status"] == "succeeded"
    [item] = client.get("/v1/jobs").json()["items"]
    metrics = finished["metrics"]
    assert item["headline"] == finished["headline"] == {
        "size_ratio": metrics["comparison"]["size_ratio"],
        "speedup_batch_1": metrics["comparison"]["speedup_batch_1"],
        "accuracy_drop": metrics["comparison"]["accuracy_drop"],
        "compressed_size_bytes": metrics["compressed"]["size_bytes"],
    }
    assert client.get(f"/v1/jobs/{item['id']}/metrics").json() == metrics


class RecordingTransport(httpx.HTTPTransport):
    """A real HTTP transport that notes each request's path, If-None-Match and status."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str | None, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.seen.append((request.url.path, request.headers.get("if-none-match"), response.status_code))
        return response


def test_the_client_lists_summaries_and_polls_with_etags(tmp_path, reference):
    transport = RecordingTransport()
    with embedded_server(tmp_path / "data") as (url, _), Client(url, transport=transport) as client:
        model = client.upload_model(reference.onnx)
        calibration, evaluation = client.upload_dataset(reference.calib_npz), client.upload_dataset(reference.eval_npz)
        job = client.submit(model, [{"type": "quantize"}], data={"calibration": calibration, "eval": evaluation})
        job.wait(timeout=600, progress=False)
        transport.seen.clear()
        job.refresh()
        assert transport.seen == [(f"/v1/jobs/{job.id}", transport.seen[0][1], 304)] and transport.seen[0][1]
        assert job.metrics["comparison"]["size_ratio"] > 1.5  # the body seen before the 304 is kept

        transport.seen.clear()
        [listed] = list(client.jobs())
        assert listed.is_summary and listed.status == "succeeded"
        assert listed.headline["size_ratio"] == job.metrics["comparison"]["size_ratio"]
        assert [path for path, _, _ in transport.seen] == ["/v1/jobs"]
        assert listed.metrics == job.metrics and not listed.is_summary  # read once, on first use
        assert [path for path, _, _ in transport.seen] == ["/v1/jobs", f"/v1/jobs/{job.id}"]
        assert "model.onnx" in listed.artifacts and len(transport.seen) == 2

        cli = subprocess.run([CLI, "jobs", "list"], env={**os.environ, "MODELPRESS_URL": url}, capture_output=True,
                             text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert cli.returncode == 0, cli.stderr
        assert f"{job.id}  succeeded" in cli.stdout
        assert f"{job.metrics['comparison']['size_ratio']:.2f}x smaller" in cli.stdout
