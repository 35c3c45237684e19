"""API keys: scopes on every route, refused keys, keys never in clear, the modes, and the first key
made by `python -m service.keys` working with the client against a served API."""

import logging
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from modelpress import Client
from modelpress.errors import ModelpressError
from service.config import Settings
from service.db import make_engine, make_session_factory, utcnow
from service.unit_of_work import transaction
from worker.serve import create_app
from service.tenants import service as tenants
from tests.processes import Process, free_port, wait_http
from tests.tenancy import add_tenant, bearer, keyed_client, keyed_settings, problem_code
from tests.test_tenant_isolation import COLLECTION_ROUTES, ID_ROUTES

SCOPE_OF = {
    **{route: "read" for route in [("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("GET", "/v1/datasets"),
                                   ("GET", "/v1/datasets/{dataset_id}"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"),
                                   ("GET", "/v1/jobs/{job_id}/artifacts/{name}"), ("GET", "/v1/jobs/{job_id}/metrics"), ("GET", "/v1/presets"),
                                   ("GET", "/v1/webhooks"), ("GET", "/v1/webhooks/{webhook_id}"),
                                   ("GET", "/v1/webhooks/{webhook_id}/deliveries"),
                                   ("GET", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}"),
                                   ("GET", "/v1/jobs/{job_id}/events"), ("GET", "/v1/uploads/{upload_id}")]},
    **{route: "write" for route in [("POST", "/v1/models"), ("DELETE", "/v1/models/{model_id}"),
                                    ("PATCH", "/v1/models/{model_id}"), ("POST", "/v1/datasets"),
                                    ("DELETE", "/v1/datasets/{dataset_id}"), ("POST", "/v1/jobs"),
                                    ("POST", "/v1/jobs/{job_id}/cancel"), ("POST", "/v1/webhooks"),
                                    ("DELETE", "/v1/webhooks/{webhook_id}"),
                                    ("POST", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/resend"),
                                    ("POST", "/v1/uploads"), ("DELETE", "/v1/uploads/{upload_id}"),
                                    ("PUT", "/v1/uploads/{upload_id}/parts/{number}"), ("POST", "/v1/uploads/{upload_id}/complete")]},
    **{route: "admin" for route in [("GET", "/v1/admin/tenants"), ("POST", "/v1/admin/tenants"),
                                    ("GET", "/v1/admin/tenants/{tenant_id}"), ("PATCH", "/v1/admin/tenants/{tenant_id}"),
                                    ("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys"), ("DELETE", "/v1/admin/keys/{key_id}"),
                                    ("GET", "/v1/admin/audit")]},
}
IDS = {"model_id": "mdl_x", "dataset_id": "ds_x", "job_id": "job_x", "name": "model.onnx", "tenant_id": "t", "key_id": "key_x",
       "webhook_id": "whk_x", "delivery_id": "msg_x", "upload_id": "upl_x", "number": "1"}


@pytest.fixture
def keyed(tmp_path):
    settings = keyed_settings(tmp_path)
    tenant = add_tenant(settings, "acme")
    with keyed_client(settings) as client:
        yield client, tenant, settings


def test_every_route_has_a_scope():
    assert set(SCOPE_OF) == set(ID_ROUTES) | COLLECTION_ROUTES


@pytest.mark.parametrize(("method", "path"), sorted(SCOPE_OF))
def test_a_key_without_the_scope_is_refused_and_no_key_is_unauthorized(keyed, method, path):
    client, tenant, _ = keyed
    url = path.format(**IDS)
    missing = client.request(method, url)
    assert (missing.status_code, problem_code(missing)) == (401, "api_key_required")
    assert missing.headers["www-authenticate"] == "Bearer"
    needed = SCOPE_OF[(method, path)]
    for scopes in ("read", "write", "admin"):
        response = client.request(method, url, headers=tenant.headers(scopes))
        if scopes == needed:
            assert problem_code(response) != "insufficient_scope", response.text
        else:
            assert (response.status_code, problem_code(response)) == (403, "insufficient_scope"), (scopes, response.text)
    # With a key that has the scope, the route answers (here: unknown ids) instead of refusing.
    granted = client.request(method, url, headers=tenant.headers("admin" if needed == "admin" else "read,write"))
    assert granted.status_code not in (401, 403) or problem_code(granted) == "operator_required"


def test_revoked_expired_and_forged_keys_are_refused(keyed):
    client, tenant, settings = keyed
    engine = make_engine(settings.effective_database_url)
    with transaction(make_session_factory(engine)) as session:
        expired = tenants.create_key(session=session, tenant_id=tenant.id, scopes="read",
                                     expires_at=utcnow() - timedelta(seconds=1)).secret
        revoked = tenants.create_key(session=session, tenant_id=tenant.id, scopes="read")
    engine.dispose()
    assert client.get("/v1/models", headers=bearer(revoked.secret)).status_code == 200
    assert client.request("DELETE", f"/v1/admin/keys/{revoked.row.id}", headers=tenant.headers("admin")).status_code == 204
    good = tenant.keys["read"]
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    for key in (revoked.secret, expired, forged, "mp_nothing_here", "not-a-key"):
        response = client.get("/v1/models", headers=bearer(key))
        assert (response.status_code, problem_code(response)) == (401, "invalid_api_key"), key
    basic = client.get("/v1/models", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert (basic.status_code, problem_code(basic)) == (401, "invalid_api_key")


def test_keys_are_stored_only_as_hashes(keyed):
    client, tenant, settings = keyed
    created = client.post("/v1/admin/keys", json={"scopes": ["read"], "name": "ci"}, headers=tenant.headers("admin")).json()
    secrets_ = [*tenant.keys.values(), created["key"]]
    assert client.get("/v1/models", headers=bearer(created["key"])).status_code == 200
    engine = create_engine(settings.effective_database_url)
    with engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(text("SELECT * FROM api_keys"))]
    engine.dispose()
    stored = repr(rows)
    assert len(rows) == len(secrets_)
    for secret in secrets_:
        assert secret not in stored and secret.split("_", 2)[2] not in stored
    assert tenants.hash_key(created["key"]) in stored
    # The database file as a whole (WAL included) holds no key either.
    raw = b"".join(p.read_bytes() for p in settings.data_dir.glob("modelpress.db*"))
    assert not any(secret.encode() in raw for secret in secrets_)
    listed = client.get("/v1/admin/keys", headers=tenant.headers("admin")).json()
    assert "key" not in listed[0] and next(k for k in listed if k["id"] == created["id"])["last_used_at"]


def test_readiness_details_are_for_an_admin_only(keyed):
    client, tenant, _ = keyed
    for headers in ({}, tenant.headers("read"), tenant.headers("write"), {"Authorization": "Bearer mp_forged_x"}):
        plain = client.get("/readyz", headers=headers)
        assert plain.status_code == 200, plain.text
        assert plain.json() == {"status": "ready", "checks": {"database": "ok", "storage": "ok", "broker": "ok"}}
    detailed = client.get("/readyz", headers=tenant.headers("admin")).json()
    assert detailed["auth"] == "api_keys" and detailed["worker"] == "embedded"


def test_modes():
    assert not Settings(data_dir="d").keys_required
    assert Settings(data_dir="d", host="0.0.0.0").keys_required
    assert Settings(data_dir="d", broker_url="redis://x").keys_required
    assert Settings(data_dir="d", environment="production").keys_required
    assert not Settings(data_dir="d", host="0.0.0.0", auth="off").keys_required
    assert Settings(data_dir="d", auth="on").keys_required


def test_default_mode_says_it_runs_without_keys(client, caplog):
    assert client.get("/readyz").json()["auth"] == "local_without_keys"
    assert client.get("/v1/models").status_code == 200


def test_auth_off_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="modelpress"):
        app = create_app(Settings(data_dir=tmp_path / "d", host="0.0.0.0", auth="off"))
    assert any("MODELPRESS_AUTH=off" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert app.state.context.settings.auth_mode == "off"


def test_first_key_from_the_cli_works_with_the_client(tmp_path, reference):
    data_dir = tmp_path / "data"
    env = {**os.environ, "MODELPRESS_DATA_DIR": str(data_dir)}
    made = subprocess.run([sys.executable, "-m", "service.keys", "create", "--tenant", "acme", "--scopes", "read,write"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("mp_") and "\n" not in key and key not in made.stderr
    port = free_port()
    api = Process("api-keyed", [sys.executable, "-m", "worker.serve"],
                  {"PORT": str(port), "MODELPRESS_DATA_DIR": str(data_dir), "MODELPRESS_AUTH": "on"}, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", api)
        with Client(url, api_key=key) as client:
            model = client.upload_model(reference.onnx, name="resnet")
            assert model.id in [m.id for m in client.models()]
        with Client(url, api_key="") as anonymous, pytest.raises(ModelpressError) as refused:
            list(anonymous.models())
        assert (refused.value.status, refused.value.code) == (401, "api_key_required")
        listed = subprocess.run([sys.executable, "-m", "service.keys", "list", "--tenant", "acme"], env=env,
                                capture_output=True, text=True, timeout=600)
        assert key.split("_")[1] in listed.stdout and key not in listed.stdout
        assert "API keys required" in api.output() and key not in api.output()
    finally:
        api.stop()
