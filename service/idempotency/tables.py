from datetime import datetime

from sqlalchemy import JSON, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow

MAX_KEY_CHARS = 255


class IdempotencyKeyRow(Base):
    """A tenant's Idempotency-Key: the request that first used it (as a fingerprint) and, once it
    has answered, that answer, replayed to every repeat until `expires_at`."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), primary_key=True)
    # "running" while the first request runs (owned by `owner`), then "done".
    state: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    # sha-256 of method, path, query, tenant and body bytes; set with the answer.
    fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_headers: Mapped[list | None] = mapped_column(JSON, nullable=True)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # When the running request took the key (a request still running long after is taken for dead).
    locked_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)
