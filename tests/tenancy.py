"""Apps that require keys, on SQLite or a fresh PostgreSQL database, and tenants with keys in them:
shared by the tenant, scope, quota and rate-limit tests."""

import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from fastapi.testclient import TestClient

from service.config import Settings
from service.db import make_engine, make_session_factory
from service.unit_of_work import transaction
from worker.serve import create_app
from service.migrate import upgrade
from service.tenants import service as tenants


@dataclass
class Tenant:
    id: str
    keys: dict[str, str]  # scope set ("read,write", "admin", ...) -> key

    def headers(self, scopes: str = "read,write") -> dict:
        return {"Authorization": f"Bearer {self.keys[scopes]}"}


def keyed_settings(tmp_path, database_url: str = "", **overrides) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, auth="on", plugins="tests.plugins", **overrides)


@contextmanager
def keyed_client(settings: Settings):
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def add_tenant(settings: Settings, name: str, scope_sets=("read,write", "read", "write", "admin"), **quotas) -> Tenant:
    """A tenant with a unique id (databases and Redis are shared within a session) and one key per scope set."""
    tenant_id = f"{name}-{uuid.uuid4().hex[:8]}"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            tenants.create_tenant(session=session, tenant_id=tenant_id, quotas=quotas)
            keys = {scopes: tenants.create_key(session=session, tenant_id=tenant_id, scopes=scopes).secret for scopes in scope_sets}
    finally:
        engine.dispose()
    return Tenant(tenant_id, keys)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def fresh_postgres_database(admin_url: str) -> tuple[str, callable]:
    """A new, empty PostgreSQL database: its URL and a function that drops it."""
    import psycopg

    name = f"modelpress_tenancy_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}", drop


def problem_code(response: httpx.Response) -> str | None:
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        return response.json().get("code")
    return None
