from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.datasets import service
from service.datasets.schemas import DatasetList, DatasetRead
from service.audit import service as audit
from service.auth import ReadCaller, WriteCaller
from service.deps import ContextDep, SessionDep
from service.openapi import upload_body
from service.uploads import receive_upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetRead, openapi_extra=upload_body(
    "an .npz with `images` and optional `labels`, or a .zip of image files", name="display name",
    preprocess="JSON: how images become model input (PreprocessSpec)"))
async def upload_dataset(request: Request, context: ContextDep, session: SessionDep, caller: WriteCaller):
    """Multipart: `file` (an .npz with `images` and optional int `labels`, or a .zip of images in
    ImageFolder layout or flat), optional `name`, optional `preprocess` (JSON, see PreprocessSpec)."""
    settings = context.settings
    upload = await receive_upload(request, tmp_dir=settings.tmp_dir, max_bytes=settings.max_dataset_bytes)
    try:
        row = await run_in_threadpool(
            service.create, session=session, store=context.store, settings=settings, tenant_id=caller.tenant_id,
            upload=upload, name=upload.fields.get("name"), preprocess=upload.fields.get("preprocess"),
            reader=context.dataset_reader,
        )
    finally:
        upload.discard()
    await run_in_threadpool(audit.record, session=session, caller=caller, action="dataset.created", resource_id=row.id)
    return row


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep, caller: ReadCaller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None,
):
    rows, next_cursor = service.list_page(session=session, tenant_id=caller.tenant_id, limit=limit, cursor=cursor)
    return DatasetList(items=rows, next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetRead)
def get_dataset(dataset_id: str, session: SessionDep, caller: ReadCaller):
    return service.get(session=session, tenant_id=caller.tenant_id, dataset_id=dataset_id)


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, context: ContextDep, session: SessionDep, caller: WriteCaller):
    service.delete(session=session, store=context.store, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    audit.record(session=session, caller=caller, action="dataset.deleted", resource_id=dataset_id)
    return Response(status_code=204)
