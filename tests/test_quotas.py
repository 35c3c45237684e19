"""Per-tenant quotas (403 quota_exceeded, nothing half-written) and request-rate limits (429 with
Retry-After), including concurrent job submissions beyond the limit."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, text

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.tenancy import add_tenant, keyed_client, keyed_settings, problem_code
from tests.test_tenant_isolation import As, backend_settings  # noqa: F401  (fixture)

RW = "read,write"


def _objects(settings, tenant, kind):
    folder = settings.data_dir / "objects" / "tenants" / tenant.id / kind
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_model_count_quota(tmp_path, reference):
    settings = keyed_settings(tmp_path)
    tenant = add_tenant(settings, "small", (RW,), max_models=1)
    with keyed_client(settings) as client:
        http = As(client, tenant.keys[RW])
        first = upload_model(http, reference.onnx)
        refused = http.post("/v1/models", files={"file": ("m.onnx", reference.onnx.read_bytes())})
        assert (refused.status_code, problem_code(refused)) == (403, "quota_exceeded")
        assert refused.json()["quota"] == "models" and refused.json()["limit"] == 1
        assert [m["id"] for m in http.get("/v1/models").json()["items"]] == [first["id"]]
        assert _objects(settings, tenant, "models") == [first["id"]]
        assert http.get(f"/v1/admin/tenants/{tenant.id}").status_code == 403  # a read,write key is not an admin key


def test_stored_bytes_quota_leaves_nothing_behind(tmp_path, reference):
    settings = keyed_settings(tmp_path)
    size = reference.onnx.stat().st_size
    tenant = add_tenant(settings, "tight", (RW, "admin"), max_stored_bytes=size + 100)
    with keyed_client(settings) as client:
        http = As(client, tenant.keys[RW])
        upload_model(http, reference.onnx)
        refused = http.post("/v1/datasets", files={"file": ("calib.npz", reference.calib_npz.read_bytes())})
        assert (refused.status_code, problem_code(refused)) == (403, "quota_exceeded")
        assert refused.json()["quota"] == "stored_bytes"
        assert http.get("/v1/datasets").json()["items"] == []
        assert _objects(settings, tenant, "datasets") == []
        assert not [p for p in settings.tmp_dir.rglob("*") if p.is_file()]
        usage = As(client, tenant.keys["admin"]).get(f"/v1/admin/tenants/{tenant.id}").json()["usage"]
        assert usage == {"stored_bytes": size, "models": 1, "datasets": 0, "active_jobs": 0}




def test_concurrent_submissions_beyond_the_job_quota(backend_settings, reference):
    settings, limit, attempts = backend_settings, 3, 10
    tenant = add_tenant(settings, "busy", (RW,), max_active_jobs=limit)
    with keyed_client(settings) as client:
        http = As(client, tenant.keys[RW])
        model = upload_model(http, reference.onnx)
        body = {"model_id": model["id"], "steps": [{"type": "wait", "params": {"seconds": 120}}], "data": {}}
        with ThreadPoolExecutor(attempts) as pool:
            answers = list(pool.map(lambda _: http.post("/v1/jobs", json=body), range(attempts)))
        accepted = [a.json()["id"] for a in answers if a.status_code == 202]
        refused = [a for a in answers if a.status_code != 202]
        assert len(accepted) == limit, [a.text for a in answers]
        assert all((a.status_code, problem_code(a)) == (403, "quota_exceeded") for a in refused)
        engine = create_engine(settings.effective_database_url)
        with engine.connect() as connection:
            stored = connection.execute(text("SELECT count(*) FROM jobs WHERE tenant_id = :t"), {"t": tenant.id}).scalar()
        engine.dispose()
        assert stored == limit
        for job_id in accepted:
            assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        for job_id in accepted:
            assert wait_finished(http, job_id)[0]["status"] == "cancelled"
        # Finished jobs free their places.
        assert http.post("/v1/jobs", json={**body, "steps": [{"type": "wait", "params": {"seconds": 0}}]}).status_code == 202


def test_request_rate_limit_per_tenant(tmp_path):
    settings = keyed_settings(tmp_path)
    limited, other = add_tenant(settings, "chatty", (RW,), max_requests_per_minute=3), add_tenant(settings, "quiet", (RW,))
    with keyed_client(settings) as client:
        http = As(client, limited.keys[RW])
        assert [http.get("/v1/models").status_code for _ in range(3)] == [200, 200, 200]
        refused = http.get("/v1/models")
        assert (refused.status_code, problem_code(refused)) == (429, "rate_limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert As(client, other.keys[RW]).get("/v1/models").status_code == 200


def test_rate_limit_is_shared_through_redis(tmp_path, redis_url):
    """Two API processes of one deployment count one tenant's requests together."""
    settings = keyed_settings(tmp_path, rate_limit_storage_url=redis_url)
    tenant = add_tenant(settings, "shared", (RW,), max_requests_per_minute=3)
    with keyed_client(settings) as first, keyed_client(settings) as second:
        assert As(first, tenant.keys[RW]).get("/v1/models").status_code == 200
        assert As(second, tenant.keys[RW]).get("/v1/models").status_code == 200
        assert As(first, tenant.keys[RW]).get("/v1/models").status_code == 200
        assert As(second, tenant.keys[RW]).get("/v1/models").status_code == 429
