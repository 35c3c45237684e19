"""The outbox: a delivery row per subscribed endpoint, written in the transaction that moves the
job (the caller commits both or neither). A job that finished is therefore announced even if no
sender was running then: the sender finds the rows whenever it starts."""

import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import utcnow
from service.ids import new_id
from service.jobs.tables import JobRow
from service.webhooks.tables import WebhookDeliveryRow, WebhookEndpointRow

FINAL_EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}


def _job_data(session: Session, job_id: str) -> dict | None:
    # Columns, not the row: the transition's UPDATE is not synchronised into the session, and a
    # row read would also load the artifacts.
    row = session.execute(select(
        JobRow.tenant_id, JobRow.status, JobRow.stage, JobRow.progress, JobRow.model_id, JobRow.error_code,
        JobRow.error_message, JobRow.headline, JobRow.finished_at,
    ).where(JobRow.id == job_id)).one_or_none()
    if row is None:
        return None
    return {
        "tenant_id": row.tenant_id,
        "job": {
            "id": job_id, "url": f"/v1/jobs/{job_id}", "status": row.status, "stage": row.stage,
            "progress": row.progress, "model_id": row.model_id,
            "error": {"code": row.error_code, "message": row.error_message} if row.error_code else None,
            "headline": row.headline,
            "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        },
    }


def announce(*, session: Session, job_id: str, event_type: str) -> int:
    """Queue `event_type` of the job for every endpoint of its tenant that subscribed to it.
    Returns how many deliveries were written; the caller commits them with the job's change."""
    found = _job_data(session, job_id)
    if found is None:
        return 0
    endpoints = [e for e in session.scalars(select(WebhookEndpointRow).where(WebhookEndpointRow.tenant_id == found["tenant_id"]))
                 if event_type in e.event_types]
    if not endpoints:
        return 0
    now = utcnow()
    # Standard Webhooks' payload shape: type, timestamp, data.
    body = json.dumps({"type": event_type, "timestamp": now.isoformat(), "data": found["job"]},
                      separators=(",", ":"), sort_keys=True)
    for endpoint in endpoints:
        session.add(WebhookDeliveryRow(id=new_id("msg"), tenant_id=found["tenant_id"], endpoint_id=endpoint.id, job_id=job_id,
                                       event_type=event_type, body=body, status="pending", next_attempt_at=now,
                                       created_at=now))
    return len(endpoints)


def announce_finished(*, session: Session, job_id: str, status: str) -> int:
    event_type = FINAL_EVENTS.get(status)
    return announce(session=session, job_id=job_id, event_type=event_type) if event_type else 0
