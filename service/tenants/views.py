"""`/v1/admin/...`: tenants, keys and the audit log. An admin key manages its own tenant; an
operator tenant's admin key also creates tenants and sets their quotas. Another tenant's id reads
404 to anyone but an operator, exactly like an unknown one."""

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service.audit import service as audit
from service.auth import AdminCaller, Caller, Forbidden
from service.deps import SessionDep
from service.errors import NotFound
from service.tenants import quotas
from service.tenants import service
from service.tenants.schemas import (ApiKeyCreate, ApiKeyIssued, ApiKeyRead, AuditList, TenantCreate, TenantQuotas,
                                     TenantRead)

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _require_operator(caller: Caller) -> None:
    if not caller.operator:
        raise Forbidden("only an operator's admin key manages other tenants", code="operator_required")


def _visible_tenant(caller: Caller, tenant_id: str) -> str:
    if tenant_id != caller.tenant_id and not caller.operator:
        raise NotFound(f"tenant {tenant_id} does not exist", code="tenant_not_found", tenant_id=tenant_id)
    return tenant_id


def _read(session, row) -> TenantRead:
    return TenantRead.model_validate(row).model_copy(update={"usage": quotas.usage(session=session, tenant_id=row.id)})


@router.get("/tenants", response_model=list[TenantRead])
def list_tenants(session: SessionDep, caller: AdminCaller):
    rows = service.list_tenants(session=session) if caller.operator else [service.get_tenant(session=session, tenant_id=caller.tenant_id)]
    return [_read(session, row) for row in rows]


@router.post("/tenants", status_code=201, response_model=TenantRead)
def create_tenant(body: TenantCreate, session: SessionDep, caller: AdminCaller):
    _require_operator(caller)
    row = service.create_tenant(session=session, tenant_id=body.id, name=body.name,
                                quotas=body.model_dump(include=set(service.QUOTA_FIELDS)))
    audit.record(session=session, caller=caller, action="tenant.created", resource_id=row.id)
    return _read(session, row)


@router.get("/tenants/{tenant_id}", response_model=TenantRead)
def get_tenant(tenant_id: str, session: SessionDep, caller: AdminCaller):
    return _read(session, service.get_tenant(session=session, tenant_id=_visible_tenant(caller, tenant_id)))


@router.patch("/tenants/{tenant_id}", response_model=TenantRead)
def set_quotas(tenant_id: str, body: TenantQuotas, session: SessionDep, caller: AdminCaller):
    _visible_tenant(caller, tenant_id)
    _require_operator(caller)
    row = service.set_quotas(session=session, tenant_id=tenant_id, quotas=body.model_dump(exclude_unset=True))
    audit.record(session=session, caller=caller, action="tenant.quotas_set", resource_id=tenant_id)
    return _read(session, row)


@router.get("/keys", response_model=list[ApiKeyRead])
def list_keys(session: SessionDep, caller: AdminCaller):
    return service.list_keys(session=session, tenant_id=caller.tenant_id)


@router.post("/keys", status_code=201, response_model=ApiKeyIssued)
def create_key(body: ApiKeyCreate, session: SessionDep, caller: AdminCaller):
    tenant_id = body.tenant_id or caller.tenant_id
    if tenant_id != caller.tenant_id:
        _visible_tenant(caller, tenant_id)
    issued = service.create_key(session=session, tenant_id=tenant_id, scopes=body.scopes, name=body.name,
                                expires_at=body.expires_at)
    audit.record(session=session, caller=caller, action="key.created", resource_id=issued.row.prefix)
    return ApiKeyIssued(**ApiKeyRead.model_validate(issued.row).model_dump(), key=issued.secret)


@router.delete("/keys/{key_id}", status_code=204)
def revoke_key(key_id: str, session: SessionDep, caller: AdminCaller):
    row = service.revoke_key(session=session, tenant_id=caller.tenant_id, key_id=key_id)
    audit.record(session=session, caller=caller, action="key.revoked", resource_id=row.prefix)
    return Response(status_code=204)


@router.get("/audit", response_model=AuditList)
def read_audit(session: SessionDep, caller: AdminCaller, limit: Annotated[int, Query(ge=1, le=1000)] = 200):
    """The caller's tenant's audit log, newest first."""
    return AuditList(items=audit.list_recent(session=session, tenant_id=caller.tenant_id, limit=limit))
