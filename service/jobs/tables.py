from datetime import datetime

from sqlalchemy import JSON, BigInteger, CheckConstraint, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.db import Base, UTCDateTime, utcnow


JOB_STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    # No foreign key: a finished job outlives the model it compressed.
    model_id: Mapped[str] = mapped_column(String(40), index=True)
    # One of states.JobStatus (the database refuses anything else: ck_jobs_status).
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(64), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # The accepted request with every default filled in: steps and data.
    spec: Mapped[dict] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(32), default="cpu")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    # A few figures copied out of `metrics` when the job finishes, so a list never loads metrics.
    headline: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Which delivery owns the job now; a stale delivery's writes are ignored.
    run_token: Mapped[str | None] = mapped_column(String(40), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The X-Request-ID of the request that created the job: the worker logs it with the job's lines.
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)

    artifacts: Mapped[list["ArtifactRow"]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="ArtifactRow.name", lazy="selectin"
    )

    __table_args__ = (
        # The list's order (newest first, cursor on created_at, id), unfiltered and by status.
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_tenant_status_created", "tenant_id", "status", "created_at", "id"),
        # The values of states.JobStatus, spelled out: states imports this module (tests/test_job_states.py
        # checks the two agree).
        CheckConstraint(f"status IN ({', '.join(repr(s) for s in JOB_STATUSES)})", name="ck_jobs_status"),
    )


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    job: Mapped[JobRow] = relationship(back_populates="artifacts")

    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)
