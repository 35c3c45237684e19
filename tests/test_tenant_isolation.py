"""Two tenants, every route, every verb: all foreign access is denied exactly as an unknown id is
(no existence oracle), own access is allowed, on SQLite and on PostgreSQL."""

import uuid

import pytest

from tests.conftest import PG_ADMIN_URL
from tests.jobs_flow import FINISHED, submit, upload_dataset, upload_model, wait_finished
from tests.tenancy import add_tenant, fresh_postgres_database, keyed_client, keyed_settings, problem_code

ALL = "read,write,admin"
QUICK_STEPS = [{"type": "quantize", "params": {"method": "dynamic_int8"}}]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_settings(request, tmp_path):
    if request.param == "sqlite":
        yield keyed_settings(tmp_path)
        return
    url, drop = fresh_postgres_database(PG_ADMIN_URL)
    try:
        yield keyed_settings(tmp_path, url)
    finally:
        drop()


class As:
    """An HTTP client acting with one key."""

    def __init__(self, client, key):
        self.client, self.headers = client, {"Authorization": f"Bearer {key}"}

    def request(self, method, url, **kwargs):
        return self.client.request(method, url, headers=self.headers, **kwargs)

    def get(self, url, **kwargs):
        return self.request("GET", url, **kwargs)

    def post(self, url, **kwargs):
        return self.request("POST", url, **kwargs)


def _same_as_unknown(foreign, unknown, foreign_id, unknown_id):
    assert foreign.status_code == unknown.status_code, (foreign.text, unknown.text)
    assert problem_code(foreign) == problem_code(unknown)
    assert foreign.text.replace(foreign_id, "ID") == unknown.text.replace(unknown_id, "ID")


# Every route under /v1 with the tenant-owned thing its path names, if any.
ID_ROUTES = {
    ("GET", "/v1/models/{model_id}"): "model_id",
    ("DELETE", "/v1/models/{model_id}"): "model_id",
    ("PATCH", "/v1/models/{model_id}"): "model_id",
    ("GET", "/v1/datasets/{dataset_id}"): "dataset_id",
    ("DELETE", "/v1/datasets/{dataset_id}"): "dataset_id",
    ("GET", "/v1/jobs/{job_id}"): "job_id",
    ("GET", "/v1/jobs/{job_id}/metrics"): "job_id",
    ("POST", "/v1/jobs/{job_id}/cancel"): "job_id",
    ("GET", "/v1/jobs/{job_id}/artifacts/{name}"): "job_id",
    ("GET", "/v1/admin/tenants/{tenant_id}"): "tenant_id",
    ("PATCH", "/v1/admin/tenants/{tenant_id}"): "tenant_id",
    ("DELETE", "/v1/admin/keys/{key_id}"): "key_id",
    ("GET", "/v1/jobs/{job_id}/events"): "job_id",
    ("GET", "/v1/uploads/{upload_id}"): "upload_id",
    ("DELETE", "/v1/uploads/{upload_id}"): "upload_id",
    ("PUT", "/v1/uploads/{upload_id}/parts/{number}"): "upload_id",
    ("POST", "/v1/uploads/{upload_id}/complete"): "upload_id",
    ("GET", "/v1/webhooks/{webhook_id}"): "webhook_id",
    ("DELETE", "/v1/webhooks/{webhook_id}"): "webhook_id",
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): "webhook_id",
    ("GET", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}"): "webhook_id",
    ("POST", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/resend"): "webhook_id",
}
COLLECTION_ROUTES = {
    ("GET", "/v1/models"), ("POST", "/v1/models"), ("GET", "/v1/datasets"), ("POST", "/v1/datasets"),
    ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/presets"),
    ("GET", "/v1/admin/tenants"), ("POST", "/v1/admin/tenants"), ("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys"),
    ("GET", "/v1/admin/audit"), ("POST", "/v1/uploads"), ("GET", "/v1/webhooks"), ("POST", "/v1/webhooks"),
}
BODIES = {("PATCH", "/v1/admin/tenants/{tenant_id}"): {"max_models": 1000}, ("PATCH", "/v1/models/{model_id}"): {"task": None}}


def test_every_route_is_in_the_matrix(client):
    routes = {(method.upper(), path) for path, operations in client.app.openapi()["paths"].items()
              if path.startswith("/v1") for method in operations}
    assert routes == set(ID_ROUTES) | COLLECTION_ROUTES


def test_foreign_access_is_denied_and_own_allowed(backend_settings, reference):
    settings = backend_settings
    a, b = add_tenant(settings, "acme", (ALL,)), add_tenant(settings, "globex", (ALL,))
    with keyed_client(settings) as client:
        as_a, as_b = As(client, a.keys[ALL]), As(client, b.keys[ALL])
        # Registered first, so the job leaves a delivery (to a name that never resolves).
        webhook = as_a.post("/v1/webhooks", json={"url": "https://hooks.invalid/modelpress"}).json()
        model, dataset = upload_model(as_a, reference.onnx), upload_dataset(as_a, reference.calib_npz)
        job, _ = wait_finished(as_a, submit(as_a, model["id"], dataset["id"], None)["id"])
        assert job["status"] == "succeeded", job["error"]
        key_id = as_a.get("/v1/admin/keys").json()[0]["id"]
        delivery_id = as_a.get(f"/v1/webhooks/{webhook['id']}/deliveries").json()["items"][0]["id"]
        # A's objects lie in A's folder of the store only.
        a_objects = settings.data_dir / "objects" / "tenants" / a.id
        for kind, thing in (("models", model), ("datasets", dataset), ("jobs", job)):
            assert (a_objects / kind / thing["id"]).is_dir(), kind
        upload = as_a.post("/v1/uploads", json={"kind": "model", "filename": "m.onnx", "size_bytes": 10}).json()
        mine = {"model_id": model["id"], "dataset_id": dataset["id"], "job_id": job["id"], "name": "report.html",
                "tenant_id": a.id, "key_id": key_id, "upload_id": upload["id"], "number": "1",
                "webhook_id": webhook["id"], "delivery_id": delivery_id}
        unknown = {"model_id": f"mdl_{uuid.uuid4().hex}", "dataset_id": f"ds_{uuid.uuid4().hex}",
                   "job_id": f"job_{uuid.uuid4().hex}", "name": "report.html", "tenant_id": f"nobody-{uuid.uuid4().hex[:8]}",
                   "key_id": f"key_{uuid.uuid4().hex}", "upload_id": f"upl_{uuid.uuid4().hex}", "number": "1",
                   "webhook_id": f"whk_{uuid.uuid4().hex}",
                   # The same delivery id under an unknown webhook: the answers must match to the byte.
                   "delivery_id": delivery_id}
        b_model, b_dataset = upload_model(as_b, reference.onnx), upload_dataset(as_b, reference.calib_npz)

        # Foreign: B's key (every scope) on A's ids answers exactly what an unknown id answers.
        for (method, path), id_field in ID_ROUTES.items():
            body = BODIES.get((method, path))
            foreign = as_b.request(method, path.format(**mine), json=body)
            missing = as_b.request(method, path.format(**unknown), json=body)
            assert foreign.status_code == 404, (method, path, foreign.text)
            _same_as_unknown(foreign, missing, mine[id_field], unknown[id_field])
        for field, steps, data in (
            ("model_id", QUICK_STEPS, {}),
            ("dataset_id", [{"type": "quantize", "params": {}}], {"calibration": "{dataset_id}"}),
            ("model_id", [{"type": "distill", "params": {"student_model_id": "{model_id}"}}], {"train": b_dataset["id"]}),
        ):
            def body(ids):
                filled = {role: value.format(**ids) for role, value in data.items()}
                model_id = ids["model_id"] if field == "model_id" and "student" not in str(steps) else b_model["id"]
                return {"model_id": model_id, "steps": [{"type": s["type"], "params": {k: v.format(**ids) if isinstance(v, str) else v
                        for k, v in s["params"].items()}} for s in steps], "data": filled}
            foreign, missing = as_b.post("/v1/jobs", json=body(mine)), as_b.post("/v1/jobs", json=body(unknown))
            assert foreign.status_code in (404, 422), foreign.text
            _same_as_unknown(foreign, missing, mine[field], unknown[field])
        foreign_key = as_b.post("/v1/admin/keys", json={"scopes": ["read"], "tenant_id": a.id})
        missing_key = as_b.post("/v1/admin/keys", json={"scopes": ["read"], "tenant_id": unknown["tenant_id"]})
        _same_as_unknown(foreign_key, missing_key, a.id, unknown["tenant_id"])
        assert problem_code(as_b.post("/v1/admin/tenants", json={"id": f"evil-{uuid.uuid4().hex[:6]}"})) == "operator_required"

        # Collections show B only its own.
        a_ids = set(mine.values()) - {"report.html", "1"}
        for path in ("/v1/models", "/v1/datasets", "/v1/jobs", "/v1/admin/keys", "/v1/admin/tenants", "/v1/admin/audit",
                     "/v1/webhooks"):
            listed = as_b.get(path)
            assert listed.status_code == 200, listed.text
            assert not any(value in listed.text for value in a_ids), path
        assert as_b.get("/v1/presets").status_code == 200
        assert b_model["id"] in as_b.get("/v1/models").text and b_model["id"] not in as_a.get("/v1/models").text
        assert as_a.get(f"/v1/datasets/{b_dataset['id']}").status_code == 404

        # Nothing of A's was changed by B's attempts.
        assert as_a.get(f"/v1/models/{model['id']}").status_code == 200
        assert [k["revoked_at"] for k in as_a.get("/v1/admin/keys").json()] == [None]

        # Own: A reaches everything it owns.
        for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
            assert mine[{"/v1/models": "model_id", "/v1/datasets": "dataset_id", "/v1/jobs": "job_id"}[path]] in as_a.get(path).text
        for method, path in ID_ROUTES:
            if method in ("GET", "PATCH") and "tenants" not in path:
                response = as_a.request(method, path.format(**mine), json=BODIES.get((method, path)))
                assert response.status_code == 200, (path, response.text)
        own = as_a.get(f"/v1/admin/tenants/{a.id}")
        assert own.status_code == 200
        # Numbers on both databases (PostgreSQL's SUM is a NUMERIC: it once came back as a string).
        assert all(type(v) is int for v in own.json()["usage"].values()), own.json()["usage"]
        assert problem_code(as_a.request("PATCH", f"/v1/admin/tenants/{a.id}", json={"max_models": 1})) == "operator_required"
        assert problem_code(as_a.post(f"/v1/jobs/{job['id']}/cancel")) == "job_finished"
        second = as_a.post("/v1/jobs", json={"model_id": model["id"], "steps": QUICK_STEPS, "data": {}})
        assert second.status_code == 202, second.text
        assert wait_finished(as_a, second.json()["id"])[0]["status"] in FINISHED
        assert as_a.request("DELETE", f"/v1/models/{model['id']}").status_code == 204
        assert as_a.request("DELETE", f"/v1/datasets/{dataset['id']}").status_code == 204
        new_key = as_a.post("/v1/admin/keys", json={"scopes": ["read"]}).json()
        assert as_a.request("DELETE", f"/v1/admin/keys/{new_key['id']}").status_code == 204
        actions = [(e["action"], e["key_prefix"]) for e in as_a.get("/v1/admin/audit").json()["items"]]
        prefix = a.keys[ALL].split("_")[1]
        for action in ("model.created", "model.task_changed", "dataset.created", "job.created", "model.deleted", "dataset.deleted", "key.created", "key.revoked",
                       "artifact.downloaded"):
            assert (action, prefix) in actions
        # B's attempts on A's things left no trace in A's log, and A's actions none in B's.
        assert all(e["key_prefix"] == prefix for e in as_a.get("/v1/admin/audit").json()["items"])


def test_report_is_served_inert(client, reference):
    """A model named like a script: its report comes as an attachment that may not run script."""
    model = upload_model(client, reference.onnx, name="<script>alert(1)</script>")
    dataset = upload_dataset(client, reference.calib_npz)
    job, _ = wait_finished(client, submit(client, model["id"], dataset["id"], None)["id"])
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.html")
    assert report.status_code == 200
    assert report.headers["x-content-type-options"] == "nosniff"
    assert report.headers["content-disposition"].startswith("attachment")
    csp = report.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "sandbox" in csp
    assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": "https://evil.example"}).headers
