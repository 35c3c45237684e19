from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class TenantRow(Base):
    """A team sharing the service. Every model, dataset, job, artifact and key belongs to one.
    A quota left empty is unlimited."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    # An operator tenant's admin keys manage other tenants; any other admin key only its own tenant.
    operator: Mapped[bool] = mapped_column(Boolean, default=False)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_models: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_datasets: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Queued and running jobs together.
    max_active_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Written by every quota check: the write takes the tenant's row lock, so checks of one tenant
    # run one at a time and two concurrent uploads cannot both pass the last free slot.
    quota_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ApiKeyRow(Base):
    """The key itself is never stored: only its sha-256 and a short public prefix to find it by."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255), default="")
    scopes: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
