"""Job states, their groups, the one table of allowed moves, and the only way a status changes:
`transition()`.

A caller names the move it makes (`from_` → `to`); the table says whether that move exists (a move
it lacks is a bug: `IllegalTransition`, before anything is written). The move itself is one
conditional UPDATE (`... WHERE status = from_`), so two deliveries of the same job cannot both win,
and a finished job never moves again: the loser of a race gets False and decides again.
"""

from collections.abc import Iterable
from enum import StrEnum

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.job_events import service as job_events
from service.jobs.tables import JobRow
from service.webhooks.outbox import announce_finished


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    # A cancel was asked of a running job: its worker ends it `cancelled` at its next heartbeat or
    # progress check (a status, not a flag beside one: one state machine).
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING})
# A worker holds the job (its heartbeat and run token count).
HELD = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})

# from -> the statuses it may move to. Every status change in the code base is one of these.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({
        JobStatus.RUNNING,     # a worker claims it
        JobStatus.CANCELLED,   # cancelled before any worker took it
        JobStatus.FAILED,      # the broker refused it, or its workers died too often
    }),
    JobStatus.RUNNING: frozenset({
        JobStatus.RUNNING,     # a re-delivery claims it again once the old heartbeat is stale
        JobStatus.QUEUED,      # the reaper hands a job whose worker died back to the queue
        JobStatus.CANCELLING,  # a cancel was asked
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
    }),
    JobStatus.CANCELLING: frozenset({
        JobStatus.CANCELLED,   # its worker saw the request (or died: the reaper settles it)
        # The worker finished (or failed) before it saw the request: the job ends as its work did.
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
    }),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move the table does not have: a bug in the caller, never a race (races return False)."""

    def __init__(self, job_id: str, from_: JobStatus, to: JobStatus):
        allowed = ", ".join(sorted(TRANSITIONS[from_])) or "nothing: it has finished"
        super().__init__(f"job {job_id}: {from_} -> {to} is not an allowed transition (from {from_}: {allowed})")
        self.job_id, self.from_, self.to = job_id, from_, to


def check_transition(job_id: str, from_: JobStatus | str, to: JobStatus) -> None:
    if JobStatus(to) not in TRANSITIONS[JobStatus(from_)]:
        raise IllegalTransition(job_id, JobStatus(from_), JobStatus(to))


def transition(session: Session, job_id: str, from_: JobStatus | str, to: JobStatus, *, owner_token: str | None = None,
               where: Iterable = (), **values) -> bool:
    """Move a job `from_` → `to` if it is still in `from_` (and owned by `owner_token`, and `where`
    holds). Returns whether it moved; raises IllegalTransition for a move the table lacks. The
    caller's transaction boundary commits."""
    check_transition(job_id, from_, to)
    conditions = [JobRow.id == job_id, JobRow.status == JobStatus(from_).value, *where]
    if owner_token is not None:
        conditions.append(JobRow.run_token == owner_token)
    result = session.execute(
        update(JobRow).where(*conditions).values(status=JobStatus(to).value, **values).execution_options(synchronize_session=False)
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
