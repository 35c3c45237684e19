import base64
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse

from service.audit import service as audit
from service.auth import ReadCaller, WriteCaller
from service.deps import ContextDep, SessionDep
from service.errors import DomainError, NotFound
from service.jobs import service
from service.jobs.schemas import JobCreate, JobList, JobRead, PresetRead
from service.jobs.tables import JobRow
from service.storage import ObjectMissing

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
presets_router = APIRouter(prefix="/v1/presets", tags=["jobs"])


@presets_router.get("", response_model=list[PresetRead])
def list_presets(_caller: ReadCaller):
    """Named recipes for `"preset"` in a job body. Steps shown for labelled training data; with
    unlabelled data, distillation is label-free (alpha 0)."""
    from worker.engine.presets import PRESETS

    return [PresetRead(name=name, description=p.description, needs=list(p.needs), steps=p.steps(True)) for name, p in PRESETS.items()]


REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; sandbox"


class ServiceUnavailable(DomainError):
    status, code, title = 503, "broker_unavailable", "Service unavailable"


def to_read(job: JobRow) -> JobRead:
    return JobRead(
        id=job.id, model_id=job.model_id, status=job.status, stage=job.stage, progress=job.progress,
        steps=job.spec["steps"], preset=job.spec.get("preset"), data=job.spec["data"], queue=job.queue, attempts=job.attempts,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        error={"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
        metrics=job.metrics or {},
        artifacts=[
            {"name": a.name, "size_bytes": a.size_bytes, "sha256": a.sha256, "url": f"/v1/jobs/{job.id}/artifacts/{a.name}"}
            for a in job.artifacts
        ],
    )


@router.post("", status_code=202, response_model=JobRead)
def create_job(body: JobCreate, response: Response, context: ContextDep, session: SessionDep, caller: WriteCaller):
    try:
        job = service.create(session=session, dispatcher=context.dispatcher, tenant_id=caller.tenant_id, body=body,
                             gpu_queue=context.settings.gpu_queue)
    except service.DispatchFailed as exc:
        raise ServiceUnavailable(f"the job was stored but could not be queued: {exc}") from exc
    audit.record(session=session, caller=caller, action="job.created", resource_id=job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return to_read(job)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep, caller: ReadCaller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None,
    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
):
    rows, next_cursor = service.list_page(session=session, tenant_id=caller.tenant_id, limit=limit, cursor=cursor, status=status)
    return JobList(items=[to_read(r) for r in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: str, session: SessionDep, caller: ReadCaller):
    return to_read(service.get(session=session, tenant_id=caller.tenant_id, job_id=job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobRead)
def cancel_job(job_id: str, session: SessionDep, caller: WriteCaller):
    job = service.cancel(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    audit.record(session=session, caller=caller, action="job.cancelled", resource_id=job_id)
    return to_read(job)


@router.get("/{job_id}/artifacts/{name}")
def download_artifact(job_id: str, name: str, context: ContextDep, session: SessionDep, caller: ReadCaller):
    artifact = service.get_artifact(session=session, tenant_id=caller.tenant_id, job_id=job_id, name=name)
    try:
        chunks = context.store.iter_chunks(artifact.storage_key)
        first = next(chunks, b"")
    except ObjectMissing as exc:
        raise NotFound(f"artifact {name!r} of job {job_id} is missing from storage", code="artifact_missing") from exc

    def body():
        yield first
        yield from chunks

    media_type = "application/json" if name.endswith(".json") else "application/octet-stream"
    return StreamingResponse(body(), media_type=media_type, headers={
        "Content-Length": str(artifact.size_bytes),
        "ETag": f'"{artifact.sha256}"',
        "X-Checksum-SHA256": artifact.sha256,
        # RFC 9530: the digest of the whole representation, base64 of the raw sha-256.
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(artifact.sha256)).decode()}:",
        "Content-Disposition": f'attachment; filename="{artifact.name}"',
        # Opened from the API origin anyway, a report (which shows user-chosen names) runs no script
        # and loads nothing: inline styles and data: images only.
        "Content-Security-Policy": REPORT_CSP,
    })
