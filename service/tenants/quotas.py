"""Per-tenant quotas: stored bytes, models, datasets, active (queued, running, cancelling) jobs.

A check takes the tenant's row lock first (an UPDATE of that row) and the caller keeps it until it
commits the new row: concurrent uploads or submissions of one tenant are checked one after the
other, so no more are accepted than the quota allows. Checks come before anything is stored, so a
refused upload leaves nothing behind.
"""

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.datasets.tables import DatasetRow
from service.db import utcnow
from service.errors import QuotaExceeded
from service.jobs.states import ACTIVE
from service.jobs.tables import ArtifactRow, JobRow
from service.models.tables import ModelRow
from service.tenants.tables import TenantRow


def _locked_tenant(session: Session, tenant_id: str) -> TenantRow | None:
    session.execute(update(TenantRow).where(TenantRow.id == tenant_id).values(quota_checked_at=utcnow()))
    return session.get(TenantRow, tenant_id, populate_existing=True)


def _count(session: Session, table, tenant_id: str, *where) -> int:
    return session.scalar(select(func.count()).select_from(table).where(table.tenant_id == tenant_id, *where)) or 0


def stored_bytes(*, session: Session, tenant_id: str) -> int:
    # int(): PostgreSQL's SUM of a BIGINT is a NUMERIC (a Decimal here), which JSON would show as a string.
    return sum(
        int(session.scalar(select(func.coalesce(func.sum(table.size_bytes), 0)).where(table.tenant_id == tenant_id)) or 0)
        for table in (ModelRow, DatasetRow, ArtifactRow)
    )


def usage(*, session: Session, tenant_id: str) -> dict:
    return {
        "stored_bytes": stored_bytes(session=session, tenant_id=tenant_id),
        "models": _count(session, ModelRow, tenant_id),
        "datasets": _count(session, DatasetRow, tenant_id),
        "active_jobs": _count(session, JobRow, tenant_id, JobRow.status.in_([s.value for s in ACTIVE])),
    }


def _refuse(what: str, limit: int, **extra) -> None:
    raise QuotaExceeded(f"this tenant's quota of {limit} {what} is used up", quota=what.replace(" ", "_"), limit=limit, **extra)


def check_upload(*, session: Session, tenant_id: str, table: type[ModelRow] | type[DatasetRow], size_bytes: int) -> None:
    tenant = _locked_tenant(session, tenant_id)
    if tenant is None:
        return
    limit, what = (tenant.max_models, "models") if table is ModelRow else (tenant.max_datasets, "datasets")
    if limit is not None and _count(session, table, tenant_id) >= limit:
        _refuse(what, limit)
    if tenant.max_stored_bytes is not None:
        used = stored_bytes(session=session, tenant_id=tenant_id)
        if used + size_bytes > tenant.max_stored_bytes:
            _refuse("stored bytes", tenant.max_stored_bytes, used_bytes=used, upload_bytes=size_bytes)


def check_job(*, session: Session, tenant_id: str) -> None:
    tenant = _locked_tenant(session, tenant_id)
    if tenant is None or tenant.max_active_jobs is None:
        return
    if _count(session, JobRow, tenant_id, JobRow.status.in_([s.value for s in ACTIVE])) >= tenant.max_active_jobs:
        _refuse("active jobs", tenant.max_active_jobs)
