"""The worker's one door to job state: claim, heartbeat, record an artifact, finish, reap.

Functions take a session factory and return plain data (frozen dataclasses, enums, ids), never a
row, so nothing of the database or the API leaks into the runner. Each call is one transaction
(`sessions.begin()`): the runner's boundary, where it commits. This module imports no FastAPI
(checked by .importlinter and tests/test_import_contracts.py: a Celery worker loads no web stack).
"""

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from modelpress.spec.errors import NotFound
from service.datasets.tables import DatasetRow
from service.db import utcnow
from service.job_events import service as job_events
from service.jobs.states import HELD, JobStatus, transition
from service.jobs.tables import ArtifactRow, JobRow
from service.models.tables import ModelRow
from service.ops import service as ops
from service.webhooks import outbox

Sessions = sessionmaker[Session]


class Heartbeat(StrEnum):
    """What the job's row tells its worker at each heartbeat (and artifact record)."""

    CONTINUE = "continue"
    CANCEL = "cancel"  # the job is `cancelling`: end it `cancelled`
    SUPERSEDED = "superseded"  # another delivery owns it now, or it has finished: stop silently


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    tenant_id: str
    model_id: str
    spec: dict
    attempts: int
    token: str  # this delivery's run token: every later write names it
    request_id: str | None = None  # of the request that created the job: the worker's log lines carry it


@dataclass(frozen=True)
class JobRef:
    id: str
    queue: str


@dataclass(frozen=True)
class StoredModel:
    id: str
    format: str
    inputs: list
    storage_key: str
    details: dict | None


@dataclass(frozen=True)
class StoredDataset:
    id: str
    format: str
    layout: str | None
    preprocess: dict | None
    shape: list
    storage_key: str


def claim(*, sessions: Sessions, job_id: str, stale_after_s: int, max_attempts: int) -> ClaimedJob | None:
    """Take the job for this delivery. A queued job is claimed; a running one only if its heartbeat
    is stale (its worker died and the broker re-delivered it). A cancelling job whose worker died is
    settled `cancelled`. Returns the job with this delivery's token, or None: nothing to do."""
    with sessions.begin() as session:
        job = session.get(JobRow, job_id, populate_existing=True)
        if job is None or JobStatus(job.status) not in (JobStatus.QUEUED, *HELD):
            return None
        current = JobStatus(job.status)
        stale_before = utcnow() - timedelta(seconds=stale_after_s)
        # A held job is claimable only when its worker stopped beating.
        claimable = (JobRow.status == JobStatus.QUEUED.value) | (JobRow.heartbeat_at < stale_before) | (JobRow.heartbeat_at.is_(None))
        if current is JobStatus.CANCELLING:
            transition(session, job_id, current, JobStatus.CANCELLED, where=(claimable,), stage="cancelled", finished_at=utcnow())
            return None
        if job.attempts >= max_attempts:
            transition(session, job_id, current, JobStatus.FAILED, where=(claimable,), error_code="worker_lost",
                       error_message=f"the job's worker stopped {job.attempts} times; giving up", finished_at=utcnow())
            return None
        token = uuid.uuid4().hex
        claimed = transition(
            session, job_id, current, JobStatus.RUNNING, where=(claimable,),
            run_token=token, attempts=JobRow.attempts + 1, heartbeat_at=utcnow(), started_at=utcnow(),
            stage="starting", progress=0.0,
        )
        if not claimed:
            return None
        session.refresh(job)
        return ClaimedJob(id=job.id, tenant_id=job.tenant_id, model_id=job.model_id, spec=job.spec, attempts=job.attempts,
                          token=token, request_id=job.request_id)


def heartbeat(*, sessions: Sessions, job_id: str, token: str, stage: str, progress: float) -> Heartbeat:
    """Record progress and the heartbeat; answer whether to go on, cancel, or stop (superseded)."""
    stage, progress = stage[:64], max(0.0, min(1.0, progress))
    with sessions.begin() as session:
        before = session.execute(select(JobRow.stage, JobRow.progress).where(JobRow.id == job_id)).one_or_none()
        moved = session.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.run_token == token, JobRow.status.in_([s.value for s in HELD]))
            .values(stage=stage, progress=progress, heartbeat_at=utcnow())
        ).rowcount
        if not moved:
            return Heartbeat.SUPERSEDED
        # A change of stage, or of progress by a percent, is the job's next `progress` event (SSE);
        # a new stage is also a `job.progress` webhook event (a heartbeat within a stage is neither).
        if before is not None and job_events.progress_changed(before.stage, before.progress, stage, progress):
            job_events.append(session=session, job_id=job_id, kind=job_events.PROGRESS, data={"stage": stage, "progress": progress})
        if before is not None and before.stage != stage:
            outbox.announce(session=session, job_id=job_id, event_type="job.progress")
        return _held_verdict(session.scalar(select(JobRow.status).where(JobRow.id == job_id)))


def log_line(*, sessions: Sessions, job_id: str, token: str, line: str) -> bool:
    """A line of the job's log (its SSE `log` events), if this delivery still holds the job."""
    with sessions.begin() as session:
        owner = session.scalar(select(JobRow.id).where(JobRow.id == job_id, JobRow.run_token == token,
                                                       JobRow.status.in_([s.value for s in HELD])).with_for_update())
        if owner is None:
            return False
        job_events.append(session=session, job_id=job_id, kind=job_events.LOG,
                          data={"line": without_server_paths(line)[:job_events.MAX_LOG_LINE_CHARS]})
        return True


def _held_verdict(status: str | None) -> Heartbeat:
    if status == JobStatus.RUNNING:
        return Heartbeat.CONTINUE
    return Heartbeat.CANCEL if status == JobStatus.CANCELLING else Heartbeat.SUPERSEDED


def record_artifact(*, sessions: Sessions, job_id: str, token: str, name: str, size_bytes: int, sha256: str,
                    storage_key: str) -> Heartbeat:
    """Point the job's artifact `name` at a stored object, if this delivery still owns the running
    job (CONTINUE); a cancelling job records nothing more (CANCEL)."""
    with sessions.begin() as session:
        status = session.scalar(select(JobRow.status).where(JobRow.id == job_id, JobRow.run_token == token).with_for_update())
        verdict = _held_verdict(status)
        if verdict is not Heartbeat.CONTINUE:
            return verdict
        existing = session.scalar(select(ArtifactRow).where(ArtifactRow.job_id == job_id, ArtifactRow.name == name))
        if existing is None:
            tenant_id = session.scalar(select(JobRow.tenant_id).where(JobRow.id == job_id))
            session.add(ArtifactRow(tenant_id=tenant_id, job_id=job_id, name=name, size_bytes=size_bytes, sha256=sha256,
                                    storage_key=storage_key))
        else:
            existing.size_bytes, existing.sha256, existing.storage_key = size_bytes, sha256, storage_key
        return Heartbeat.CONTINUE


def finish(*, sessions: Sessions, job_id: str, token: str, status: JobStatus, metrics: dict | None = None,
           error_code: str | None = None, error_message: str | None = None) -> bool:
    """End the job this delivery holds (running or cancelling). False: it no longer holds it."""
    values = {"finished_at": utcnow(), "stage": status.value, "error_code": error_code,
              "error_message": without_server_paths(error_message)}
    if status == JobStatus.SUCCEEDED:
        values["progress"] = 1.0
    if metrics is not None:
        values["metrics"] = metrics
        values["headline"] = headline_of(metrics)
    with sessions.begin() as session:
        current = session.scalar(select(JobRow.status).where(JobRow.id == job_id, JobRow.run_token == token))
        if current is None or JobStatus(current) not in HELD:
            return False
        moved = transition(session, job_id, current, status, owner_token=token, **values)
        if moved and metrics is not None:
            # Counted in the transaction that finishes the job: once, whichever worker finished it.
            tenant_id, spec = session.execute(select(JobRow.tenant_id, JobRow.spec).where(JobRow.id == job_id)).one()
            ops.record_step_durations(session=session, tenant_id=tenant_id, spec_steps=spec["steps"],
                                      step_metrics=metrics.get("steps") or [])
        return moved


def reap_stale(*, sessions: Sessions, stale_after_s: int) -> list[JobRef]:
    """Hand jobs whose worker died (stale heartbeat) back to the queue, for the caller to dispatch
    again; a cancelling one is cancelled instead (its cancel needs no worker)."""
    stale_before = utcnow() - timedelta(seconds=stale_after_s)
    is_stale = JobRow.heartbeat_at < stale_before
    with sessions.begin() as session:
        stale = session.execute(select(JobRow.id, JobRow.status, JobRow.queue).where(
            JobRow.status.in_([s.value for s in HELD]), is_stale)).all()
        requeued = []
        for job_id, status, queue in stale:
            if status == JobStatus.CANCELLING:
                transition(session, job_id, status, JobStatus.CANCELLED, where=(is_stale,), stage="cancelled", finished_at=utcnow())
            elif transition(session, job_id, status, JobStatus.QUEUED, where=(is_stale,), stage="requeued", run_token=None):
                requeued.append(JobRef(job_id, queue))
        return requeued


def queued(*, sessions: Sessions, older_than_s: int = 0) -> list[JobRef]:
    """Queued jobs, oldest first; with `older_than_s`, only those queued at least that long (their
    message may have been lost: sending it again is harmless, claims are exclusive)."""
    query = select(JobRow.id, JobRow.queue).where(JobRow.status == JobStatus.QUEUED.value)
    if older_than_s:
        query = query.where(JobRow.created_at < utcnow() - timedelta(seconds=older_than_s))
    with sessions() as session:
        return [JobRef(job_id, queue) for job_id, queue in session.execute(query.order_by(JobRow.created_at))]


def is_held(*, sessions: Sessions, job_id: str) -> bool:
    """Whether some delivery holds the job now (running or cancelling)."""
    with sessions() as session:
        return session.scalar(select(JobRow.status).where(JobRow.id == job_id)) in {s.value for s in HELD}


def live_run_tokens(*, sessions: Sessions, job_ids: list[str]) -> dict[str, str]:
    """The delivery token of each of these jobs that a worker holds now (for cleaning up work folders)."""
    with sessions() as session:
        rows = session.execute(select(JobRow.id, JobRow.run_token).where(
            JobRow.id.in_(job_ids), JobRow.status.in_([s.value for s in HELD]))).all()
    return {job_id: token for job_id, token in rows if token}


def model(*, sessions: Sessions, tenant_id: str, model_id: str) -> StoredModel:
    with sessions() as session:
        row = session.get(ModelRow, model_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFound(f"model {model_id} does not exist", code="model_not_found", model_id=model_id)
        return StoredModel(id=row.id, format=row.format, inputs=list(row.inputs or []), storage_key=row.storage_key,
                           details=row.details)


def datasets(*, sessions: Sessions, tenant_id: str, dataset_ids: Mapping[str, str]) -> dict[str, StoredDataset]:
    """The datasets a job names, by role."""
    found = {}
    with sessions() as session:
        for role, dataset_id in dataset_ids.items():
            row = session.get(DatasetRow, dataset_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFound(f"dataset {dataset_id} does not exist", code="dataset_not_found", dataset_id=dataset_id)
            found[role] = StoredDataset(id=row.id, format=row.format, layout=row.layout, preprocess=row.preprocess,
                                        shape=list(row.shape), storage_key=row.storage_key)
    return found


_SERVER_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.\-]+/)+([\w.\-]*)")


def without_server_paths(message: str | None) -> str | None:
    """Job errors are read by users: a library's message naming a file on the worker
    (`/srv/data/tmp/job_.../converted.onnx`) keeps only the file's name."""
    return _SERVER_PATH.sub(lambda m: m.group(1) or "<folder>", message) if message else message


def headline_of(metrics: dict) -> dict | None:
    """The list's figures for a job: size ratio, batch-1 speed-up, accuracy drop, compressed size."""
    comparison, compressed = metrics.get("comparison") or {}, metrics.get("compressed") or {}
    figures = {
        "size_ratio": comparison.get("size_ratio"),
        "speedup_batch_1": comparison.get("speedup_batch_1"),
        "accuracy_drop": comparison.get("accuracy_drop"),
        "compressed_size_bytes": compressed.get("size_bytes"),
    }
    return figures if any(v is not None for v in figures.values()) else None
