from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.audit import service as audit
from service.auth import ReadCaller, WriteCaller
from service.deps import ContextDep, SessionDep
from service.models import service
from service.models.schemas import ModelList, ModelRead, ModelUpdate
from service.openapi import upload_body
from service.uploads import receive_upload

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post("", status_code=201, response_model=ModelRead, openapi_extra=upload_body(
    "ONNX (or a .zip of an .onnx and its external data), torch.export .pt2 or TorchScript", name="display name",
    task='what the model is for, as JSON (e.g. {"type": "detection"}); its jobs use it unless they give their own'))
async def upload_model(request: Request, context: ContextDep, session: SessionDep, caller: WriteCaller):
    """Multipart: `file` (ONNX, torch.export .pt2 or TorchScript), optional `name` and `task` (JSON)."""
    upload = await receive_upload(request, tmp_dir=context.settings.tmp_dir, max_bytes=context.settings.max_model_bytes)
    try:
        row = await run_in_threadpool(
            service.create, session=session, store=context.store, tenant_id=caller.tenant_id,
            upload=upload, name=upload.fields.get("name"), task=upload.fields.get("task"), max_unpacked_bytes=4 * context.settings.max_model_bytes,
            reader=context.model_reader,
        )
    finally:
        upload.discard()
    await run_in_threadpool(audit.record, session=session, caller=caller, action="model.created", resource_id=row.id)
    return row


@router.get("", response_model=ModelList)
def list_models(
    session: SessionDep, caller: ReadCaller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None,
    sha256: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$", description="only uploads of the file with this sha256")] = None,
):
    rows, next_cursor = service.list_page(session=session, tenant_id=caller.tenant_id, limit=limit, cursor=cursor, sha256=sha256)
    return ModelList(items=rows, next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelRead)
def get_model(model_id: str, session: SessionDep, caller: ReadCaller):
    return service.get(session=session, tenant_id=caller.tenant_id, model_id=model_id)


@router.patch("/{model_id}", response_model=ModelRead)
def update_model(model_id: str, body: ModelUpdate, session: SessionDep, caller: WriteCaller):
    """Change the model's `task` (`{"task": {...}}`) or clear it (`{"task": null}`): checked as the
    upload's `task` field is (`invalid_task`, `task_does_not_fit_model`). Jobs already accepted keep
    the task they were accepted with; `Idempotency-Key` as on POSTs."""
    row = service.set_task(session=session, tenant_id=caller.tenant_id, model_id=model_id, task=body.task)
    audit.record(session=session, caller=caller, action="model.task_changed", resource_id=model_id)
    return row


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, context: ContextDep, session: SessionDep, caller: WriteCaller):
    service.delete(session=session, store=context.store, tenant_id=caller.tenant_id, model_id=model_id)
    audit.record(session=session, caller=caller, action="model.deleted", resource_id=model_id)
    return Response(status_code=204)
