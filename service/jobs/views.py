import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from service.audit import service as audit
from service.auth import ReadCaller, WriteCaller
from service.conditional import encoded, json_or_not_modified
from service.deps import ContextDep, SessionDep
from service.errors import NotFound
from service.jobs import service
from service.jobs.schemas import JobCreate, JobFullList, JobList, JobRead, JobSummary, MetricsRead, PresetRead
from service.jobs.states import JobStatus
from service.jobs.tables import JobRow
from service.ops.context import request_id_var
from service.storage import ObjectMissing

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
presets_router = APIRouter(prefix="/v1/presets", tags=["jobs"])


@presets_router.get("", response_model=list[PresetRead])
def list_presets(_caller: ReadCaller):
    """Named recipes for `"preset"` in a job body. Steps shown for labelled training data; with
    unlabelled data, distillation is label-free (alpha 0)."""
    from modelpress.spec.presets import PRESETS

    return [PresetRead(name=name, description=p.description, needs=list(p.needs), steps=p.steps(True)) for name, p in PRESETS.items()]


REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; sandbox"


def _common_fields(job: JobRow) -> dict[str, Any]:
    return {
        "id": job.id, "model_id": job.model_id, "status": job.status, "stage": job.stage, "progress": job.progress,
        "preset": job.spec.get("preset"), "queue": job.queue, "attempts": job.attempts,
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
        "headline": job.headline, "request_id": job.request_id,
    }


def to_summary(job: JobRow) -> JobSummary:
    return JobSummary(**_common_fields(job))


def to_read(job: JobRow) -> JobRead:
    return JobRead(
        **_common_fields(job), steps=job.spec["steps"], data=job.spec["data"], task=job.spec.get("task"),
        floor=job.spec.get("floor", "default"), metrics=job.metrics or {},
        artifacts=[
            {"name": a.name, "size_bytes": a.size_bytes, "sha256": a.sha256, "url": f"/v1/jobs/{job.id}/artifacts/{a.name}"}
            for a in job.artifacts
        ],
    )


@router.post("", status_code=202, response_model=JobRead)
def create_job(body: JobCreate, context: ContextDep, session: SessionDep, caller: WriteCaller):
    # A broker that refuses the job answers 503 `broker_unavailable` when the request commits.
    job = service.create(session=session, dispatcher=context.dispatcher, tenant_id=caller.tenant_id, body=body,
                         gpu_queue=context.settings.gpu_queue, request_id=request_id_var.get())
    audit.record(session=session, caller=caller, action="job.created", resource_id=job.id)
    return encoded(to_read(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("", response_model=JobList | JobFullList)
def list_jobs(
    session: SessionDep, caller: ReadCaller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None,
    status: Annotated[str | None, Query(pattern=f"^({'|'.join(JobStatus)})$")] = None,
    view: Annotated[Literal["summary", "full"], Query(description=(
        "`summary` (the default): a `JobSummary` per job, without metrics, steps or artifacts. "
        "`full`: each job as `GET /v1/jobs/{id}` returns it."))] = "summary",
):
    """Jobs, newest first. The summary view is one database query for the page."""
    full = view == "full"
    rows, next_cursor = service.list_page(session=session, tenant_id=caller.tenant_id, limit=limit, cursor=cursor,
                                          status=status, full=full)
    if full:
        return encoded(JobFullList(items=[to_read(r) for r in rows], next_cursor=next_cursor))
    return encoded(JobList(items=[to_summary(r) for r in rows], next_cursor=next_cursor))


_CONDITIONAL = {304: {"description": "Not Modified: the job is unchanged since the ETag given in If-None-Match."}}


@router.get("/{job_id}", response_model=JobRead, responses=_CONDITIONAL)
def get_job(job_id: str, request: Request, session: SessionDep, caller: ReadCaller):
    """The job with its metrics and artifacts. Carries an `ETag`; send it back in `If-None-Match`
    when polling and an unchanged job answers 304 with no body."""
    return json_or_not_modified(request, to_read(service.get(session=session, tenant_id=caller.tenant_id, job_id=job_id)))


@router.get("/{job_id}/metrics", response_model=MetricsRead, responses=_CONDITIONAL)
def get_job_metrics(job_id: str, request: Request, session: SessionDep, caller: ReadCaller):
    """The job's metrics.json (docs/METRICS.md); `{}` until the job has finished. ETag as for the job."""
    job = service.get(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    return json_or_not_modified(request, MetricsRead(job.metrics or {}))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobRead)
def cancel_job(job_id: str, session: SessionDep, caller: WriteCaller):
    job = service.cancel(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    audit.record(session=session, caller=caller, action="job.cancelled", resource_id=job_id)
    return encoded(to_read(job), status_code=202)


@router.get("/{job_id}/artifacts/{name}")
@router.head("/{job_id}/artifacts/{name}", include_in_schema=False)  # HEAD: as GET, without the body
def download_artifact(job_id: str, name: str, request: Request, context: ContextDep, session: SessionDep, caller: ReadCaller):
    artifact = service.get_artifact(session=session, tenant_id=caller.tenant_id, job_id=job_id, name=name)
    media_type = "application/json" if name.endswith(".json") else "application/octet-stream"
    headers = {
        "Content-Length": str(artifact.size_bytes),
        "ETag": f'"{artifact.sha256}"',
        "X-Checksum-SHA256": artifact.sha256,
        # RFC 9530: the digest of the whole representation, base64 of the raw sha-256.
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(artifact.sha256)).decode()}:",
        "Content-Disposition": f'attachment; filename="{artifact.name}"',
        # Opened from the API origin anyway, a report (which shows user-chosen names) runs no script
        # and loads nothing: inline styles and data: images only.
        "Content-Security-Policy": REPORT_CSP,
    }
    if request.method == "HEAD":  # the headers a GET would send (size, digest), without reading storage
        return Response(media_type=media_type, headers=headers)
    # Who took a copy of what: the artifact's name when it fits the column, else the job alone.
    downloaded = f"{job_id}/{artifact.name}"
    redirect_s = context.settings.download_redirect_s
    # On S3, a large artifact may go straight from the bucket (MODELPRESS_DOWNLOAD_REDIRECT_S). The
    # report stays on the API: it is opened in a browser and must keep its CSP.
    if redirect_s and hasattr(context.store, "presigned_get") and name != "report.html":
        url = context.store.presigned_get(artifact.storage_key, filename=artifact.name, expires_s=redirect_s)
        audit.record(session=session, caller=caller, action="artifact.downloaded",
                     resource_id=downloaded if len(downloaded) <= 64 else job_id)
        return Response(status_code=307, headers={"Location": url, "ETag": headers["ETag"],
                                                  "X-Checksum-SHA256": artifact.sha256, "Cache-Control": "no-store"})
    try:
        chunks = context.store.iter_chunks(artifact.storage_key)
        first = next(chunks, b"")
    except ObjectMissing as exc:
        raise NotFound(f"artifact {name!r} of job {job_id} is missing from storage", code="artifact_missing") from exc
    audit.record(session=session, caller=caller, action="artifact.downloaded",
                 resource_id=downloaded if len(downloaded) <= 64 else job_id)

    def body():
        yield first
        yield from chunks

    return StreamingResponse(body(), media_type=media_type, headers=headers)
