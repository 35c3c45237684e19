from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class UploadSessionRow(Base):
    __tablename__ = "upload_sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # "model" or "dataset"
    status: Mapped[str] = mapped_column(String(16))  # open, completing, completed, failed, aborted, expired
    filename: Mapped[str] = mapped_column(String(255))
    # The form fields a single-request upload would carry (name, preprocess).
    fields: Mapped[dict] = mapped_column(JSON, default=dict)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # of the whole file, if the client gave it
    part_bytes: Mapped[int] = mapped_column(Integer)
    part_count: Mapped[int] = mapped_column(Integer)
    storage_prefix: Mapped[str] = mapped_column(String(512))
    result_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the model or dataset made
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_upload_sessions_tenant_status", "tenant_id", "status"),
        Index("ix_upload_sessions_status_expires", "status", "expires_at"),
    )


class UploadPartRow(Base):
    __tablename__ = "upload_parts"

    session_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("upload_sessions.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
