"""A job's events: appended by `service.jobs` in the transaction that changes the job, read by
the SSE stream (`views.py`) in order of `seq`.

Numbering is `max(seq) + 1` of the job. Every append happens after the transaction has written
(and so locked) the job's row, which puts the appends of one job one after the other: no two get
one number, and a reader never sees event n+1 before event n is committed.
"""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db import utcnow
from service.job_events.tables import JobEventRow
from service.jobs.tables import JobRow

STATUS, PROGRESS, LOG = "status", "progress", "log"
# Per job: progress and log lines past this are dropped (status events are always kept), so a
# chatty technique cannot fill the table. A progress event is written per 1% or per stage, so a
# job stays far below it.
MAX_EVENTS_PER_JOB = 5000
MAX_LOG_LINE_CHARS = 1000
# A progress event when the stage changes or progress moved by this much (the runner writes
# progress about once a second and on every heartbeat; most writes change nothing worth sending).
PROGRESS_STEP = 0.01


def append(*, session: Session, job_id: str, kind: str, data: dict) -> int | None:
    """Add an event after the job's row was written in this transaction; the caller commits.
    Returns its number, or None when a progress or log event passed the per-job bound."""
    tenant_id, last = session.execute(
        select(JobRow.tenant_id, select(func.coalesce(func.max(JobEventRow.seq), 0))
               .where(JobEventRow.job_id == job_id).scalar_subquery())
        .where(JobRow.id == job_id)
    ).one()
    if kind != STATUS and last >= MAX_EVENTS_PER_JOB:
        return None
    session.add(JobEventRow(job_id=job_id, seq=last + 1, tenant_id=tenant_id, kind=kind,
                            data={**data, "at": utcnow().isoformat()}))
    session.flush()
    return last + 1


def progress_changed(old_stage: str | None, old_progress: float | None, stage: str, progress: float) -> bool:
    return old_stage != stage or old_progress is None or abs(progress - old_progress) >= PROGRESS_STEP


def after(*, session: Session, job_id: str, seq: int, limit: int) -> list[JobEventRow]:
    """The job's events numbered above `seq`, oldest first, at most `limit`."""
    return list(session.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id, JobEventRow.seq > seq)
                                .order_by(JobEventRow.seq).limit(limit)))


def last_seq(*, session: Session, job_id: str) -> int:
    return session.scalar(select(func.coalesce(func.max(JobEventRow.seq), 0)).where(JobEventRow.job_id == job_id))
