"""The sender's side of deliveries (worker/webhooks.py calls these): claim due ones, record how
each attempt went. A claim is a conditional UPDATE (status `sending`, due time pushed past the
attempt), so senders in several workers never post the same attempt twice; a sender that died
mid-attempt leaves a claim that expires and is taken again."""

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.db import utcnow
from service.webhooks.tables import WebhookDeliveryRow, WebhookEndpointRow

D = WebhookDeliveryRow


@dataclass(frozen=True)
class Claimed:
    id: str
    attempt: int
    url: str
    secret: str
    body: str


def claim_due(*, session: Session, limit: int, lease_s: float) -> list[Claimed]:
    now = utcnow()
    due = (D.next_attempt_at <= now) & or_(D.status == "pending", D.status == "sending")
    candidates = list(session.scalars(select(D.id).where(due).order_by(D.next_attempt_at).limit(limit)))
    claimed = []
    for delivery_id in candidates:
        moved = session.execute(
            update(D).where(D.id == delivery_id, due)
            .values(status="sending", attempts=D.attempts + 1, next_attempt_at=now + timedelta(seconds=lease_s))
        ).rowcount
        session.commit()
        if moved:
            claimed.append(delivery_id)
    if not claimed:
        return []
    rows = session.execute(
        select(D.id, D.attempts, D.body, WebhookEndpointRow.url, WebhookEndpointRow.secret)
        .join(WebhookEndpointRow, WebhookEndpointRow.id == D.endpoint_id).where(D.id.in_(claimed))
    ).all()
    by_id = {row.id: Claimed(row.id, row.attempts, row.url, row.secret, row.body) for row in rows}
    return [by_id[i] for i in claimed if i in by_id]


def retry_wait_s(failures: int, schedule: list[float]) -> float | None:
    """The wait after the `failures`-th failure in a row, or None when the schedule is used up."""
    return schedule[failures - 1] if 1 <= failures <= len(schedule) else None


def record_attempt(*, session: Session, claimed: Claimed, status_code: int | None, error: str | None,
                   schedule: list[float]) -> str | None:
    """Settle the claimed attempt: succeeded on a 2xx, otherwise pending with the next wait of the
    schedule, or failed once it is used up. Returns the new status; None when the claim is gone
    (the endpoint was deleted, or the claim expired and another sender took it)."""
    row = session.scalar(select(D).where(D.id == claimed.id, D.status == "sending", D.attempts == claimed.attempt))
    if row is None:
        session.rollback()
        return None
    now = utcnow()
    values = {"last_status_code": status_code, "last_error": error[:500] if error else None, "last_attempt_at": now}
    if status_code is not None and 200 <= status_code < 300:
        values |= {"status": "succeeded", "delivered_at": now, "next_attempt_at": None, "failures_in_a_row": 0}
    else:
        failures = row.failures_in_a_row + 1
        wait = retry_wait_s(failures, schedule)
        values |= {"failures_in_a_row": failures, "status": "failed" if wait is None else "pending",
                   "next_attempt_at": None if wait is None else now + timedelta(seconds=wait)}
    session.execute(update(D).where(D.id == claimed.id, D.status == "sending", D.attempts == claimed.attempt).values(**values))
    session.commit()
    return values["status"]
