"""Who is calling: the API key in `Authorization: Bearer <key>`, its tenant and scopes.

Routes take a caller with the scope they need (`ReadCaller`, `WriteCaller`, `AdminCaller`) and
pass `caller.tenant_id` to the service functions, which scope every query by it. Each request of a
tenant also counts against its request rate.
"""

from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db import utcnow
from service.deps import ContextDep, SessionDep
from service.errors import DomainError
from service.tenants import service as tenants
from service.tenants.tables import ApiKeyRow, TenantRow
from service.unit_of_work import transaction

# last_used_at is written at most this often per key: not a database write on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class Unauthorized(DomainError):
    status, code, title = 401, "api_key_required", "Unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(DomainError):
    status, code, title = 403, "insufficient_scope", "Forbidden"


class RateLimited(DomainError):
    status, code, title = 429, "rate_limited", "Too many requests"


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    scopes: frozenset[str]
    # The key's public prefix, for the audit log; empty without a key.
    key_prefix: str = ""
    # Manages other tenants (an operator tenant's admin key, or the local user without keys).
    operator: bool = False


def _caller_from_key(session: Session, session_factory: sessionmaker[Session], secret: str) -> Caller:
    key = tenants.verify_key(session=session, secret=secret)
    if key is None:
        raise Unauthorized("the API key is unknown, revoked or expired", code="invalid_api_key")
    _touch(session_factory, key)
    tenant = session.get(TenantRow, key.tenant_id)
    return Caller(tenant_id=key.tenant_id, scopes=frozenset(key.scopes), key_prefix=key.prefix,
                  operator=bool(tenant and tenant.operator and "admin" in key.scopes))


def _touch(session_factory: sessionmaker[Session], key: ApiKeyRow) -> None:
    # A transaction of its own, not the request's: a key's use counts even when the request fails.
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        with transaction(session_factory) as own:
            own.execute(update(ApiKeyRow).where(ApiKeyRow.id == key.id).values(last_used_at=now))


def authenticate(request: Request, context: ContextDep, session: SessionDep) -> Caller:
    settings = context.settings
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("use Authorization: Bearer <key>", code="invalid_api_key")
        caller = _caller_from_key(session, context.session_factory, secret.strip())
    elif settings.keys_required:
        raise Unauthorized("this service requires an API key: Authorization: Bearer <key>")
    else:
        # The embedded default on loopback: the local user, as before keys existed.
        caller = Caller(tenant_id=settings.default_tenant, scopes=frozenset(tenants.SCOPES), operator=True)
    tenant = session.get(TenantRow, caller.tenant_id)
    per_minute = (tenant.max_requests_per_minute if tenant else None) or settings.requests_per_minute
    retry_after = context.limiter.retry_after(tenant_id=caller.tenant_id, per_minute=per_minute)
    if retry_after is not None:
        raise RateLimited(f"more than {per_minute} requests a minute for this tenant; retry in {retry_after} s",
                          headers={"Retry-After": str(retry_after)}, retry_after_s=retry_after)
    return caller


def tenant_of(*, authorization: str, session: Session, settings) -> str | None:
    """The tenant a request's Authorization header names, or None when it names none that is valid
    (the route then refuses it). For what runs before the routes (idempotency keys): no rate
    count, no last-used write."""
    if authorization:
        scheme, _, secret = authorization.partition(" ")
        key = tenants.verify_key(session=session, secret=secret.strip()) if scheme.lower() == "bearer" else None
        return key.tenant_id if key is not None else None
    return None if settings.keys_required else settings.default_tenant


def requires(scope: str):
    def caller_with_scope(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
        if scope not in caller.scopes:
            raise Forbidden(f"this key lacks the {scope!r} scope", required_scope=scope)
        return caller

    return caller_with_scope


ReadCaller = Annotated[Caller, Depends(requires("read"))]
WriteCaller = Annotated[Caller, Depends(requires("write"))]
AdminCaller = Annotated[Caller, Depends(requires("admin"))]
