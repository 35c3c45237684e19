"""Job states, their groups, and the only way a status changes: `transition()`.

A transition is one conditional UPDATE (`... WHERE status IN (allowed sources)`), so two deliveries
of the same job cannot both win, and a finished job never moves again.
"""

from enum import StrEnum

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.jobs.tables import JobRow
from service.webhooks.outbox import announce_finished


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    # running -> running: a re-delivered job is claimed again by its new delivery.
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
    # running -> queued: the reaper hands a job whose worker died back to the queue.
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING}),
    JobStatus.SUCCEEDED: frozenset({JobStatus.RUNNING}),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
}


def transition(session: Session, job_id: str, to: JobStatus, *, owner_token: str | None = None,
               only_from: frozenset[JobStatus] | None = None, where=(), **values) -> bool:
    """Move a job to `to` if it is in an allowed source state (and owned by `owner_token`, if given).
    Returns whether it moved. The caller commits."""
    sources = ALLOWED[to] if only_from is None else ALLOWED[to] & only_from
    conditions = [JobRow.id == job_id, JobRow.status.in_([s.value for s in sources]), *where]
    if owner_token is not None:
        conditions.append(JobRow.run_token == owner_token)
    result = session.execute(
        update(JobRow).where(*conditions).values(status=to.value, **values).execution_options(synchronize_session=False)
    )
    moved = result.rowcount == 1
    if moved and to in FINISHED:
        # Here, not in each caller: every way a job ends (runner, cancel, broker refusal, worker
        # lost) writes its webhook deliveries in the transaction that ends it.
        announce_finished(session=session, job_id=job_id, status=to.value)
    return moved
