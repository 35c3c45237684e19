"""Jobs for the API: accept, read, cancel. The worker's side (claim, heartbeat, finish) is
`runner_api`.

Status changes go through `states.transition`. The broker only ever carries a job id, sent after
the job's row is committed.
"""

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, defer, joinedload, raiseload, sessionmaker

from service.datasets import service as datasets
from service.db import utcnow
from service.dispatch import Dispatcher
from service.errors import Conflict, DomainError, Invalid, NotFound
from service.ids import new_id
from service.job_events import service as job_events
from service.jobs.schemas import JobCreate, StepSpec
from service.jobs.states import ACTIVE, FINISHED, JobStatus, transition
from service.jobs.tables import ArtifactRow, JobRow
from service.models import service as models
from service.pagination import newest_first
from service.tenants import quotas
from service.unit_of_work import after_commit, transaction
from modelpress.spec.configs import parse_step
from modelpress.spec.floor import FLOOR_METRICS, unknown_metrics
from modelpress.spec.labels import labels_misfit
from modelpress.spec.errors import EngineError
from modelpress.spec.presets import PRESETS
from modelpress.spec.shapes import check_dataset_fits

log = logging.getLogger(__name__)


class DispatchFailed(DomainError):
    """The job was stored (and is now `failed`), but the broker refused it."""

    status, code, title = 503, "broker_unavailable", "Service unavailable"


# A cancel races with a claim or a finish; each lost race means the job moved on (queued -> running
# -> finished), so a few tries settle it. Only the reaper's running -> queued could cycle, once a minute.
CANCEL_TRIES = 3


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


def _task(body: JobCreate, model) -> dict | None:
    """The job's own task (checked, defaults filled in), else the one given at its model's upload
    (checked then), else None: the worker infers it from the output shapes."""
    if body.task is None:
        return model.task
    return models.checked_task(body.task, model.outputs, model=f"model {model.id}")


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
    task = _task(body, model)
    if unknown := unknown_metrics(body.floor):
        raise Invalid(f"floor: no task's floor has {', '.join(map(repr, unknown))}; the metrics are {', '.join(FLOOR_METRICS)}",
                      code="invalid_floor")

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
    output_shapes = [output.get("shape") for output in model.outputs or []]
    for role, dataset in rows.items():
        problem = labels_misfit(task, dataset.labels, count=dataset.count, input_shape=image_input["shape"] if image_input else None,
                                output_shapes=output_shapes)
        if problem is not None:
            raise Invalid(f"the {role} dataset's labels do not fit the task on model {model.id}: {problem}",
                          code="labels_do_not_fit_task", role=role)
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
            "task": task,
            "floor": body.floor,
        },
        metrics={}, request_id=request_id,
    )
    session.add(job)
    session.flush()
    job_events.append(session=session, job_id=job.id, kind=job_events.STATUS,
                      data={"status": job.status, "stage": job.stage, "progress": job.progress})
    log.info("job %s: accepted for queue %s", job.id, job.queue)
    # Sent only once the job's row is committed: a worker never looks for a job that is not there.
    sessions = sessionmaker(session.get_bind(), expire_on_commit=False)
    job_id, queue = job.id, job.queue
    after_commit(session, lambda: enqueue(sessions=sessions, dispatcher=dispatcher, job_id=job_id, queue=queue))
    return job


def enqueue(*, sessions: sessionmaker[Session], dispatcher: Dispatcher, job_id: str, queue: str) -> None:
    """Send the committed job's id to a worker. If the broker refuses, the job fails with a clear
    code instead of staying queued forever (in a transaction of its own: the job's is committed)."""
    try:
        dispatcher.enqueue(job_id, queue=queue)
    except Exception as exc:
        with transaction(sessions) as session:
            transition(session, job_id, JobStatus.QUEUED, JobStatus.FAILED, error_code="broker_unavailable",
                       error_message=f"the job could not be queued: {exc}", finished_at=utcnow())
        raise DispatchFailed(f"the job was stored but could not be queued: {exc}", job_id=job_id) from exc


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
    """A queued job is cancelled at once; a running one becomes `cancelling` and its worker ends it
    `cancelled` at its next heartbeat or progress check. Asking again changes nothing."""
    for _ in range(CANCEL_TRIES):
        job = get(session=session, tenant_id=tenant_id, job_id=job_id)
        session.refresh(job)
        current = JobStatus(job.status)
        if current in FINISHED:
            raise Conflict(f"job {job_id} has already finished ({job.status})", code="job_finished", status_value=job.status)
        if current is JobStatus.CANCELLING:
            return job
        if current is JobStatus.QUEUED:
            moved = transition(session, job_id, current, JobStatus.CANCELLED, stage="cancelled", finished_at=utcnow())
        else:
            moved = transition(session, job_id, current, JobStatus.CANCELLING)
        if moved:
            session.flush()
            session.refresh(job)
            return job
        # It moved meanwhile (a worker claimed it, or it finished): decide again from where it is now.
    raise RuntimeError(f"job {job_id} changed state {CANCEL_TRIES} times while being cancelled")


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
