"""Tenants and their API keys. Keyword-only, no HTTP.

A key reads `mp_<prefix>_<secret>`: the prefix is public (it finds the row and names the key in
the audit log), the whole key is stored only as its sha-256. Keys carry 256 random bits, so a
plain hash is as strong as a slow one and a lookup stays one indexed read.
"""

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import Conflict, Invalid, NotFound
from service.ids import new_id
from service.tenants.tables import ApiKeyRow, TenantRow  # noqa: F401  (TenantRow for callers)

SCOPES = ("read", "write", "admin")
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
QUOTA_FIELDS = ("max_stored_bytes", "max_models", "max_datasets", "max_active_jobs", "max_requests_per_minute")


@dataclass(frozen=True)
class IssuedKey:
    """A key as created: `secret` is shown this once and never again."""

    row: ApiKeyRow
    secret: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(scopes: list[str] | str) -> list[str]:
    names = [s.strip() for s in scopes.split(",")] if isinstance(scopes, str) else list(scopes)
    unknown = sorted(set(names) - set(SCOPES))
    if unknown or not names:
        raise Invalid(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}", code="invalid_scopes")
    return [s for s in SCOPES if s in names]


# --- tenants --------------------------------------------------------------------------------------

def create_tenant(*, session: Session, tenant_id: str, name: str | None = None, operator: bool = False,
                  quotas: dict | None = None) -> TenantRow:
    if not TENANT_ID.match(tenant_id):
        raise Invalid("a tenant id is 1-63 lowercase letters, digits and dashes", code="invalid_tenant_id")
    if session.get(TenantRow, tenant_id) is not None:
        raise Conflict(f"tenant {tenant_id} already exists", code="tenant_exists", tenant_id=tenant_id)
    row = TenantRow(id=tenant_id, name=name or tenant_id, operator=operator, **(quotas or {}))
    session.add(row)
    session.flush()
    return row


def get_tenant(*, session: Session, tenant_id: str) -> TenantRow:
    row = session.get(TenantRow, tenant_id)
    if row is None:
        raise NotFound(f"tenant {tenant_id} does not exist", code="tenant_not_found", tenant_id=tenant_id)
    return row


def ensure_tenant(*, session: Session, tenant_id: str) -> TenantRow:
    row = session.get(TenantRow, tenant_id)
    return row if row is not None else create_tenant(session=session, tenant_id=tenant_id)


def list_tenants(*, session: Session) -> list[TenantRow]:
    return list(session.scalars(select(TenantRow).order_by(TenantRow.id)))


def set_quotas(*, session: Session, tenant_id: str, quotas: dict) -> TenantRow:
    row = get_tenant(session=session, tenant_id=tenant_id)
    for field, value in quotas.items():
        if field in QUOTA_FIELDS:
            setattr(row, field, value)
    session.flush()
    return row


# --- keys -----------------------------------------------------------------------------------------

def create_key(*, session: Session, tenant_id: str, scopes: list[str] | str, name: str = "",
               expires_at: datetime | None = None) -> IssuedKey:
    get_tenant(session=session, tenant_id=tenant_id)
    prefix = secrets.token_hex(6)
    secret = f"mp_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKeyRow(id=new_id("key"), tenant_id=tenant_id, prefix=prefix, key_hash=hash_key(secret), name=name[:255],
                    scopes=parse_scopes(scopes), expires_at=expires_at)
    session.add(row)
    session.flush()
    return IssuedKey(row=row, secret=secret)


def list_keys(*, session: Session, tenant_id: str) -> list[ApiKeyRow]:
    return list(session.scalars(select(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id).order_by(ApiKeyRow.created_at)))


def revoke_key(*, session: Session, tenant_id: str, key_id: str) -> ApiKeyRow:
    row = session.get(ApiKeyRow, key_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"key {key_id} does not exist", code="key_not_found", key_id=key_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def verify_key(*, session: Session, secret: str) -> ApiKeyRow | None:
    """The live key `secret` is, or None: unknown, wrong, revoked and expired keys look alike."""
    parts = secret.split("_")
    if len(parts) < 3 or parts[0] != "mp":
        return None
    row = session.scalar(select(ApiKeyRow).where(ApiKeyRow.prefix == parts[1]))
    # Compared in constant time: the response time says nothing about how much of a guess was right.
    if row is None or not hmac.compare_digest(row.key_hash, hash_key(secret)):
        return None
    now = utcnow()
    if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return None
    return row
