"""The audit log: who (a key's public prefix) created, cancelled or deleted what."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.tables import AuditEventRow


def record(*, session: Session, caller, action: str, resource_id: str) -> None:
    """`caller`: the request's `service.auth.Caller` (its tenant and key prefix)."""
    session.add(AuditEventRow(tenant_id=caller.tenant_id, key_prefix=caller.key_prefix, action=action, resource_id=resource_id))


def list_recent(*, session: Session, tenant_id: str, limit: int) -> list[AuditEventRow]:
    query = select(AuditEventRow).where(AuditEventRow.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(AuditEventRow.at.desc(), AuditEventRow.id.desc()).limit(limit)))
