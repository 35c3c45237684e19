"""Job states, their groups, and the only way a status changes: `transition()`.

A transition is one conditional UPDATE (`... WHERE status IN (allowed sources)`), so two deliveries
of the same job cannot both win, and a finished job never moves again.
"""

from enum import StrEnum

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.job_events import service as job_events
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
    Returns whether it moved, and records the move as the job's next `status` event. The caller commits."""
    sources = ALLOWED[to] if only_from is None else ALLOWED[to] & only_from
    conditions = [JobRow.id == job_id, JobRow.status.in_([s.value for s in sources]), *where]
    if owner_token is not None:
        conditions.append(JobRow.run_token == owner_token)
    result = session.execute(
        update(JobRow).where(*conditions).values(status=to.value, **values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    job_events.append(session=session, job_id=job_id, kind=job_events.STATUS, data=status_event(to, values))
    if to in FINISHED:
        # Here, not in each caller: every way a job ends (runner, cancel, broker refusal, worker
        # lost) writes its webhook deliveries in the transaction that ends it.
        announce_finished(session=session, job_id=job_id, status=to.value)
    return True


def status_event(to: JobStatus, values: dict) -> dict:
    """What a status event says: the new status and the plain values written with it (SQL
    expressions such as `attempts + 1` are left out)."""
    data: dict = {"status": to.value}
    for name in ("stage", "progress"):
        if isinstance(values.get(name), str | float | int):
            data[name] = values[name]
    if isinstance(values.get("error_code"), str):
        data["error"] = {"code": values["error_code"], "message": values.get("error_message") or ""}
    return data
