"""Idempotency keys: take a key for a request, keep its answer, or give the key back.

Keyword-only functions on a session, no HTTP (the middleware in `middleware.py` is the HTTP side).
A key is taken by inserting its row: the primary key (tenant, key) lets exactly one of several
concurrent requests in; the others find it running and wait, or find its answer.
"""

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import DomainError
from service.idempotency.tables import IdempotencyKeyRow

RUNNING, DONE = "running", "done"


class KeysExhausted(DomainError):
    status, code, title = 429, "idempotency_keys_exhausted", "Too many requests"


@dataclass(frozen=True)
class Taken:
    """This request owns the key: run it, then `keep` its answer or `give_back` the key."""

    owner: str


@dataclass(frozen=True)
class Answer:
    fingerprint: str
    status_code: int
    headers: list[list[str]]
    body: bytes


def take(*, session: Session, tenant_id: str, key: str, owner: str, method: str, path: str, ttl_s: int,
         running_timeout_s: int, max_keys: int) -> Taken | Answer | None:
    """Take `key` for a new request, or the answer of the request that took it first. None: that
    request is still running (ask again shortly)."""
    now = utcnow()
    # Expired keys of this tenant go first, so an expired key is free again and the table stays bounded.
    session.execute(delete(IdempotencyKeyRow).where(IdempotencyKeyRow.tenant_id == tenant_id,
                                                    IdempotencyKeyRow.expires_at <= now))
    row = session.get(IdempotencyKeyRow, (tenant_id, key), populate_existing=True)
    if row is None:
        held = session.scalar(select(func.count()).select_from(IdempotencyKeyRow)
                              .where(IdempotencyKeyRow.tenant_id == tenant_id))
        if held >= max_keys:
            session.commit()
            raise KeysExhausted(f"this tenant holds {held} unexpired idempotency keys (at most {max_keys}); "
                                "send the request without Idempotency-Key or retry when keys expire",
                                headers={"Retry-After": "60"})
        session.add(IdempotencyKeyRow(tenant_id=tenant_id, key=key, state=RUNNING, owner=owner, method=method,
                                      path=path[:512], created_at=now, locked_at=now,
                                      expires_at=now + timedelta(seconds=ttl_s)))
        try:
            session.commit()
            return Taken(owner)
        except IntegrityError:  # another request took it between our read and our insert
            session.rollback()
            return None
    session.commit()
    if row.state == DONE:
        return Answer(row.fingerprint or "", row.status_code or 200, row.response_headers or [], row.response_body or b"")
    if row.locked_at <= now - timedelta(seconds=running_timeout_s):
        # The request that took it has been running far too long: its API process died mid-request.
        moved = session.execute(update(IdempotencyKeyRow).where(
            IdempotencyKeyRow.tenant_id == tenant_id, IdempotencyKeyRow.key == key,
            IdempotencyKeyRow.state == RUNNING, IdempotencyKeyRow.owner == row.owner,
        ).values(owner=owner, locked_at=now)).rowcount
        session.commit()
        if moved:
            return Taken(owner)
    return None


def keep(*, session: Session, tenant_id: str, key: str, owner: str, fingerprint: str, answer: Answer) -> None:
    """Store the first answer under the key, for every repeat until the key expires."""
    session.execute(update(IdempotencyKeyRow).where(
        IdempotencyKeyRow.tenant_id == tenant_id, IdempotencyKeyRow.key == key, IdempotencyKeyRow.owner == owner,
    ).values(state=DONE, fingerprint=fingerprint, status_code=answer.status_code, response_headers=answer.headers,
             response_body=answer.body))
    session.commit()


def give_back(*, session: Session, tenant_id: str, key: str, owner: str) -> None:
    """Free the key: the request ended with no answer worth repeating (a 5xx, a body not read to
    its end, a client gone), so a retry with the same key runs anew."""
    session.execute(delete(IdempotencyKeyRow).where(
        IdempotencyKeyRow.tenant_id == tenant_id, IdempotencyKeyRow.key == key, IdempotencyKeyRow.owner == owner,
        IdempotencyKeyRow.state == RUNNING))
    session.commit()
