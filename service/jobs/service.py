"""Jobs: accept, read, cancel (for the API) and claim, report, finish (for the runner).

Status changes go through `states.transition`. The broker only ever carries a job id, sent after
the job's row is committed.
"""

import logging
import re
import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, defer, joinedload, raiseload

from service.datasets import service as datasets
from service.db import utcnow
from service.dispatch import Dispatcher
from service.errors import Conflict, Invalid, NotFound
from service.ids import new_id
from service.job_events import service as job_events
from service.jobs.schemas import JobCreate, StepSpec
from service.jobs.states import ACTIVE, FINISHED, JobStatus, transition
from service.jobs.tables import ArtifactRow, JobRow
from service.models import service as models
from service.ops import service as ops
from service.pagination import newest_first
from service.tenants import quotas
from service.webhooks import outbox
from modelpress.spec.configs import parse_step
from modelpress.spec.errors import EngineError
from modelpress.spec.presets import PRESETS
from modelpress.spec.shapes import check_dataset_fits

log = logging.getLogger(__name__)


class DispatchFailed(Exception):
    pass


def expand_preset(*, session: Session, tenant_id: str, body: JobCreate) -> list[StepSpec]:
    """A preset's steps, fitted to the data: label-free distillation when the training data has no labels."""
    preset = PRESETS.get(body.preset)
    if preset is None:
        raise Invalid(f"unknown preset {body.preset!r}; known: {', '.join(sorted(PRESETS))}", code="unknown_preset")
    train_id = body.data.train or (body.data.split.dataset if body.data.split else None)
    labelled = train_id is not None and datasets.get(session=session, tenant_id=tenant_id, dataset_id=train_id).has_labels
    return [StepSpec.model_validate(step) for step in preset.steps(labelled)]


def _check_referenced_models(*, session: Session, tenant_id: str, model, configs: list) -> None:
    """Teachers and students named by id exist, and a student answers in the teacher's shape."""
    for index, config in enumerate(configs):
        rows = {}
        for role, model_id in config.referenced_models().items():
            try:
                rows[role] = models.get(session=session, tenant_id=tenant_id, model_id=model_id)
            except NotFound as exc:
                raise Invalid(f"step {index}: {role}_model_id {model_id} does not exist", code=f"{role}_model_not_found", step=index) from exc
        if "student" in rows:
            teacher, student = rows.get("teacher", model), rows["student"]
            shapes = [(m.outputs or [{}])[0].get("shape") for m in (teacher, student)]
            if all(shapes) and all(isinstance(d, int) for shape in shapes for d in shape[1:]) and shapes[0][1:] != shapes[1][1:]:
                raise Invalid(f"step {index}: the student's output shape {shapes[1]} differs from the teacher's {shapes[0]}",
                              code="student_output_mismatch", step=index)


def create(*, session: Session, dispatcher: Dispatcher, tenant_id: str, body: JobCreate, gpu_queue: bool,
           request_id: str | None = None) -> JobRow:
    model = models.get(session=session, tenant_id=tenant_id, model_id=body.model_id)
    steps = body.steps if body.preset is None else expand_preset(session=session, tenant_id=tenant_id, body=body)
    configs = []
    for index, step in enumerate(steps):
        try:
            configs.append(parse_step(step.type, step.params))
        except EngineError as exc:
            raise Invalid(exc.message, code=exc.code, step=index) from exc
    _check_referenced_models(session=session, tenant_id=tenant_id, model=model, configs=configs)

    needed = set().union(*(c.required_data() for c in configs))
    split = body.data.split
    for role in sorted(needed):
        if getattr(body.data, role) is None and split is None:
            raise Invalid(f"a step needs a {role} dataset: set data.{role} to a dataset id (or data.split)", code=f"{role}_data_required")
    image_input = model.inputs[0] if model.inputs else None
    if len(model.inputs) > 1:
        raise Invalid(f"models with {len(model.inputs)} inputs are not supported yet; one image input is", code="unsupported_model_input")
    named = {role: dataset_id for role, dataset_id in body.data.model_dump(exclude={"split"}).items() if dataset_id}
    if split is not None:
        named["split"] = split.dataset
    rows = {role: datasets.get(session=session, tenant_id=tenant_id, dataset_id=dataset_id) for role, dataset_id in named.items()}
    for role, dataset in rows.items():
        try:
            check_dataset_fits(dataset.shape, dataset.layout, dataset.preprocess or {},
                               image_input["shape"] if image_input else None,
                               role=role, input_name=image_input["name"] if image_input else "input")
        except EngineError as exc:
            raise Invalid(exc.message, code=exc.code) from exc
    for role in sorted(set().union(*(c.required_labels() for c in configs))):
        dataset = rows.get(role) or rows.get("split")
        if dataset is not None and not dataset.has_labels:
            raise Invalid(f"a step needs labels in the {role} data (an accuracy guard: use min_top1_agreement; training: distill from the original)",
                          code=f"{role}_labels_required")
    if split is not None and rows["split"].count < 2:
        raise Invalid("a dataset of one sample cannot be split", code="dataset_too_small")

    quotas.check_job(session=session, tenant_id=tenant_id)
    job = JobRow(
        id=new_id("job"), tenant_id=tenant_id, model_id=model.id, status=JobStatus.QUEUED.value, stage="queued",
        progress=0.0, queue="gpu" if gpu_queue and any(c.wants_gpu() for c in configs) else "cpu",
        spec={
            "steps": [{"type": s.type, "params": c.model_dump()} for s, c in zip(steps, configs)],
            "data": body.data.model_dump(),
            "preset": body.preset,
        },
        metrics={}, request_id=request_id,
    )
    session.add(job)
    session.flush()
    job_events.append(session=session, job_id=job.id, kind=job_events.STATUS,
                      data={"status": job.status, "stage": job.stage, "progress": job.progress})
    session.commit()
    log.info("job %s: accepted for queue %s", job.id, job.queue)
    enqueue(session=session, dispatcher=dispatcher, job=job)
    return job


def enqueue(*, session: Session, dispatcher: Dispatcher, job: JobRow) -> None:
    """Send the committed job's id to a worker. If the broker refuses, the job fails with a clear
    code instead of staying queued forever."""
    try:
        dispatcher.enqueue(job.id, queue=job.queue)
    except Exception as exc:
        transition(session, job.id, JobStatus.FAILED, error_code="broker_unavailable",
                   error_message=f"the job could not be queued: {exc}", finished_at=utcnow())
        session.commit()
        session.refresh(job)
        raise DispatchFailed(str(exc)) from exc


def get(*, session: Session, tenant_id: str, job_id: str) -> JobRow:
    # Artifacts joined in: one round trip for a job read, the route polled most.
    job = session.get(JobRow, job_id, options=[joinedload(JobRow.artifacts)])
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} does not exist", code="job_not_found", job_id=job_id)
    return job


def list_page(*, session: Session, tenant_id: str, limit: int, cursor: str | None, status: str | None = None,
              full: bool = False):
    """A page of jobs, newest first. Without `full`, the rows lack metrics and artifacts (a summary
    needs neither), so the page is one query; with it, artifacts come in one more for the page."""
    where = (JobRow.status == status,) if status else ()
    # raiseload: a summary that touched either would fail loudly instead of querying per row.
    options = () if full else (defer(JobRow.metrics, raiseload=True), raiseload(JobRow.artifacts))
    return newest_first(session=session, table=JobRow, tenant_id=tenant_id, limit=limit, cursor=cursor, where=where,
                        options=options)


def cancel(*, session: Session, tenant_id: str, job_id: str) -> JobRow:
    job = get(session=session, tenant_id=tenant_id, job_id=job_id)
    if transition(session, job_id, JobStatus.CANCELLED, only_from=frozenset({JobStatus.QUEUED}),
                  stage="cancelled", finished_at=utcnow()):
        session.commit()
    else:
        # A running job stops at its runner's next progress check.
        moved = session.execute(
            update(JobRow).where(JobRow.id == job_id, JobRow.status == JobStatus.RUNNING.value).values(cancel_requested=True)
        ).rowcount
        if moved:
            job_events.append(session=session, job_id=job_id, kind=job_events.LOG,
                              data={"line": "cancel requested: the job stops at its next progress check"})
        session.commit()
        if not moved:
            session.refresh(job)
            raise Conflict(f"job {job_id} has already finished ({job.status})", code="job_finished", status_value=job.status)
    session.refresh(job)
    return job


def get_artifact(*, session: Session, tenant_id: str, job_id: str, name: str) -> ArtifactRow:
    job = get(session=session, tenant_id=tenant_id, job_id=job_id)
    if job.status in {s.value for s in ACTIVE}:
        # Not a 404: the artifact is coming, and a client (curl -f) must not save this as the file.
        raise Conflict(f"job {job_id} is {job.status}: its artifacts are stored when it finishes",
                       code="job_not_finished", job_id=job_id, job_status=job.status)
    for artifact in job.artifacts:
        if artifact.name == name:
            return artifact
    raise NotFound(f"job {job_id} has no artifact {name!r}", code="artifact_not_found", job_id=job_id)


def active_jobs_using_model(*, session: Session, model_id: str) -> bool:
    query = select(JobRow.id).where(JobRow.model_id == model_id, JobRow.status.in_([s.value for s in ACTIVE]))
    return session.scalar(query.limit(1)) is not None


def active_jobs_using_dataset(*, session: Session, dataset_id: str) -> bool:
    active = session.scalars(select(JobRow).where(JobRow.status.in_([s.value for s in ACTIVE])))
    return any(dataset_id in _dataset_ids(job.spec.get("data", {})) for job in active)


def _dataset_ids(data: dict) -> set[str]:
    ids = {value for key, value in data.items() if key != "split" and value}
    if data.get("split"):
        ids.add(data["split"]["dataset"])
    return ids


# --- for the runner -------------------------------------------------------------------------------

def claim(*, session: Session, job_id: str, stale_after_s: int, max_attempts: int) -> tuple[JobRow, str] | None:
    """Take the job for this delivery. A queued job is claimed; a running one only if its heartbeat
    is stale (its worker died and the broker re-delivered it). Returns the job and this delivery's
    token, or None when there is nothing to do."""
    job = session.get(JobRow, job_id, populate_existing=True)
    if job is None or job.status in FINISHED:
        return None
    stale_before = utcnow() - timedelta(seconds=stale_after_s)
    # Claimable: queued, or running with a stale heartbeat (its worker died). A live run is left alone.
    claimable = (JobRow.status == JobStatus.QUEUED.value) | (JobRow.heartbeat_at < stale_before) | (JobRow.heartbeat_at.is_(None))
    if job.attempts >= max_attempts:
        transition(session, job_id, JobStatus.FAILED, where=(claimable,), error_code="worker_lost",
                   error_message=f"the job's worker stopped {job.attempts} times; giving up", finished_at=utcnow())
        session.commit()
        return None
    token = uuid.uuid4().hex
    claimed = transition(
        session, job_id, JobStatus.RUNNING,
        where=(claimable,),
        run_token=token, attempts=JobRow.attempts + 1, heartbeat_at=utcnow(), started_at=utcnow(),
        stage="starting", progress=0.0,
    )
    session.commit()
    if not claimed:
        return None
    session.refresh(job)
    return job, token


def report(*, session: Session, job_id: str, token: str, stage: str, progress: float) -> str:
    """Record progress and heartbeat. Returns "ok", "cancel" (a cancel was requested) or "lost"
    (another delivery owns the job now). A change of stage, or of progress by a percent, is also the
    job's next `progress` event; a new stage is also a `job.progress` webhook event, written with it
    (a heartbeat or a percent within a stage is not)."""
    stage, progress = stage[:64], max(0.0, min(1.0, progress))
    before = session.execute(select(JobRow.stage, JobRow.progress).where(JobRow.id == job_id)).one_or_none()
    moved = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.run_token == token, JobRow.status == JobStatus.RUNNING.value)
        .values(stage=stage, progress=progress, heartbeat_at=utcnow())
    ).rowcount
    if moved and before is not None and job_events.progress_changed(before.stage, before.progress, stage, progress):
        job_events.append(session=session, job_id=job_id, kind=job_events.PROGRESS, data={"stage": stage, "progress": progress})
    if moved and before is not None and before.stage != stage:
        outbox.announce(session=session, job_id=job_id, event_type="job.progress")
    session.commit()
    if not moved:
        return "lost"
    return "cancel" if session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)) else "ok"


def log_line(*, session: Session, job_id: str, token: str, line: str) -> bool:
    """A line of the job's log (its SSE `log` events), if this delivery still owns the job."""
    owner = session.scalar(select(JobRow.id).where(JobRow.id == job_id, JobRow.run_token == token,
                                                   JobRow.status == JobStatus.RUNNING.value).with_for_update())
    if owner is None:
        session.rollback()
        return False
    job_events.append(session=session, job_id=job_id, kind=job_events.LOG,
                      data={"line": without_server_paths(line)[:job_events.MAX_LOG_LINE_CHARS]})
    session.commit()
    return True


def record_artifact(*, session: Session, job_id: str, token: str, name: str, size_bytes: int, sha256: str,
                    storage_key: str) -> bool:
    """Point the job's artifact `name` at a stored object, if this delivery still owns the job."""
    owner = session.scalar(select(JobRow.id).where(JobRow.id == job_id, JobRow.run_token == token,
                                                   JobRow.status == JobStatus.RUNNING.value).with_for_update())
    if owner is None:
        session.rollback()
        return False
    existing = session.scalar(select(ArtifactRow).where(ArtifactRow.job_id == job_id, ArtifactRow.name == name))
    if existing is None:
        tenant_id = session.scalar(select(JobRow.tenant_id).where(JobRow.id == job_id))
        session.add(ArtifactRow(tenant_id=tenant_id, job_id=job_id, name=name, size_bytes=size_bytes, sha256=sha256,
                                storage_key=storage_key))
    else:
        existing.size_bytes, existing.sha256, existing.storage_key = size_bytes, sha256, storage_key
    session.commit()
    return True


def finish(*, session: Session, job_id: str, token: str, status: JobStatus, metrics: dict | None = None,
           error_code: str | None = None, error_message: str | None = None) -> bool:
    values = {"finished_at": utcnow(), "stage": status.value, "error_code": error_code,
              "error_message": without_server_paths(error_message)}
    if status == JobStatus.SUCCEEDED:
        values["progress"] = 1.0
    if metrics is not None:
        values["metrics"] = metrics
        values["headline"] = headline_of(metrics)
    moved = transition(session, job_id, status, owner_token=token, only_from=frozenset({JobStatus.RUNNING}), **values)
    if moved and metrics is not None:
        # Counted in the transaction that finishes the job: once, whichever worker finished it.
        tenant_id, spec = session.execute(select(JobRow.tenant_id, JobRow.spec).where(JobRow.id == job_id)).one()
        ops.record_step_durations(session=session, tenant_id=tenant_id, spec_steps=spec["steps"],
                                  step_metrics=metrics.get("steps") or [])
    session.commit()
    return moved


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


def reap_stale(*, session: Session, stale_after_s: int) -> list[str]:
    """Hand jobs whose worker died (stale heartbeat) back to the queue. Returns their ids for the
    caller to re-dispatch."""
    stale_before = utcnow() - timedelta(seconds=stale_after_s)
    stale = list(session.scalars(select(JobRow.id).where(
        JobRow.status == JobStatus.RUNNING.value, JobRow.heartbeat_at < stale_before)))
    requeued = [job_id for job_id in stale if transition(
        session, job_id, JobStatus.QUEUED, only_from=frozenset({JobStatus.RUNNING}),
        where=(JobRow.heartbeat_at < stale_before,), stage="requeued", run_token=None)]
    session.commit()
    return requeued


def live_run_tokens(*, session: Session, job_ids: list[str]) -> dict[str, str]:
    """The delivery token of each of these jobs that is running now (for cleaning up work folders)."""
    rows = session.execute(
        select(JobRow.id, JobRow.run_token).where(JobRow.id.in_(job_ids), JobRow.status == JobStatus.RUNNING.value)
    ).all()
    return {job_id: token for job_id, token in rows if token}


def queued_ids(*, session: Session, older_than_s: int = 0) -> list[str]:
    """Queued jobs, oldest first; with `older_than_s`, only those queued at least that long (their
    message may have been lost: sending it again is harmless, claims are exclusive)."""
    query = select(JobRow.id).where(JobRow.status == JobStatus.QUEUED.value)
    if older_than_s:
        query = query.where(JobRow.created_at < utcnow() - timedelta(seconds=older_than_s))
    return list(session.scalars(query.order_by(JobRow.created_at)))
