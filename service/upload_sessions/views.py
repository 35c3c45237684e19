from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from service.audit import service as audit
from service.auth import ReadCaller, WriteCaller
from service.datasets.schemas import DatasetRead
from service.deps import ContextDep, SessionDep
from service.errors import PROBLEM_JSON
from service.models.schemas import ModelRead
from service.openapi import Problem
from service.upload_sessions import service
from service.upload_sessions.receive import expected_checksum, receive_part
from service.upload_sessions.schemas import UploadComplete, UploadCreate, UploadPartRead, UploadRead

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], responses={
    410: {"description": "The upload session expired (`upload_expired`); its parts are deleted", "model": Problem,
          "content": {PROBLEM_JSON: {}}}})

PART_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


@router.post("", status_code=201, response_model=UploadRead)
def create_upload(spec: UploadCreate, context: ContextDep, session: SessionDep, caller: WriteCaller):
    """Start a resumable upload: then PUT each part, then POST .../complete."""
    row = service.create(session=session, store=context.store, settings=context.settings, tenant_id=caller.tenant_id,
                         spec=spec)
    return service.read(session=session, row=row)


@router.get("/{upload_id}", response_model=UploadRead)
def get_upload(upload_id: str, context: ContextDep, session: SessionDep, caller: ReadCaller):
    """The session and the parts received so far: a client resumes by sending the others."""
    row = service.get(session=session, store=context.store, tenant_id=caller.tenant_id, upload_id=upload_id)
    return service.read(session=session, row=row)


@router.put("/{upload_id}/parts/{number}", response_model=UploadPartRead, openapi_extra=PART_BODY)
async def put_part(
    upload_id: str, number: Annotated[int, Path(ge=1, le=1_000_000)], request: Request, context: ContextDep,
    session: SessionDep, caller: WriteCaller,
    content_md5: Annotated[str | None, Header(alias="Content-MD5", max_length=64)] = None,
    checksum_sha256: Annotated[str | None, Header(alias="x-checksum-sha256", max_length=128)] = None,
):
    """The part's bytes as the body, with `Content-MD5` (base64) or `x-checksum-sha256` (hex or
    base64). Every part but the last is `part_bytes` long. Sending a part again replaces it."""
    _, expected = await run_in_threadpool(service.open_for_part, session=session, store=context.store,
                                          tenant_id=caller.tenant_id, upload_id=upload_id, number=number)
    checksum = expected_checksum(content_md5=content_md5, checksum_sha256=checksum_sha256)
    part = await receive_part(request, tmp_dir=context.settings.tmp_dir, number=number, expected_bytes=expected,
                              checksum=checksum)
    try:
        return await run_in_threadpool(service.store_part, session=session, store=context.store,
                                       tenant_id=caller.tenant_id, upload_id=upload_id, number=number, part=part)
    finally:
        part.discard()


@router.post("/{upload_id}/complete", status_code=201, response_model=ModelRead | DatasetRead)
async def complete_upload(upload_id: str, response: Response, context: ContextDep, session: SessionDep,
                          caller: WriteCaller, spec: UploadComplete | None = None):
    """Join the parts and create the model or dataset, with the checks of a single-request upload
    (201). Repeated after it succeeded, the same model or dataset (200)."""
    resource, created = await run_in_threadpool(service.complete, session=session, store=context.store,
                                                settings=context.settings, tenant_id=caller.tenant_id, upload_id=upload_id,
                                                sha256=spec.sha256 if spec else None,
                                                readers=(context.model_reader, context.dataset_reader))
    if created:
        kind = "model" if isinstance(resource, service.ModelRow) else "dataset"
        await run_in_threadpool(audit.record, session=session, caller=caller, action=f"{kind}.created",
                                resource_id=resource.id)
    else:
        response.status_code = 200
    return resource


@router.delete("/{upload_id}", status_code=204)
def abort_upload(upload_id: str, context: ContextDep, session: SessionDep, caller: WriteCaller):
    """Abort: the parts are deleted. Aborting a finished upload only deletes what is left."""
    service.abort(session=session, store=context.store, tenant_id=caller.tenant_id, upload_id=upload_id)
    return Response(status_code=204)
