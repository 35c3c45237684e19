"""Model records: create from an upload, read, list, delete. Keyword-only, no HTTP."""

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Conflict, NotFound
from service.ids import clean_name, new_id
from service.models.inspect import inspect_model
from service.models.sandboxed import SandboxedModelReader
from service.models.tables import ModelRow
from service.pagination import newest_first
from service.storage import ObjectStore, tenant_prefix
from service.tenants import quotas
from service.unit_of_work import after_commit, on_rollback
from service.uploads import ReceivedUpload

FILE_NAMES = {"onnx": "model.onnx", "torch_export": "model.pt2", "torchscript": "model.pt"}


def create(*, session: Session, store: ObjectStore, tenant_id: str, upload: ReceivedUpload, name: str | None,
           max_unpacked_bytes: int, reader: SandboxedModelReader | None = None) -> ModelRow:
    # reader: read the upload in a limited child process (the API does); None: in this process.
    if reader is None:
        info = inspect_model(upload.path, max_unpacked_bytes=max_unpacked_bytes)
    else:
        info = reader.inspect(upload.path, max_unpacked_bytes=max_unpacked_bytes)
    model_id = new_id("mdl")
    file_name = "model.zip" if info.details.get("packaging") == "zip" else FILE_NAMES[info.format]
    key = f"{tenant_prefix(tenant_id)}models/{model_id}/{file_name}"
    quotas.check_upload(session=session, tenant_id=tenant_id, table=ModelRow, size_bytes=upload.size_bytes)
    # The object is written before the row: a row never points at a missing object.
    store.put_file(key, upload.path)
    row = ModelRow(
        id=model_id,
        tenant_id=tenant_id,
        name=clean_name(name or Path(upload.filename).stem or model_id),
        format=info.format,
        size_bytes=upload.size_bytes,
        sha256=upload.sha256,
        storage_key=key,
        inputs=info.inputs,
        outputs=info.outputs,
        details=info.details,
    )
    # The row failed (now or at the request's commit): leave no orphan object behind.
    on_rollback(session, lambda: store.delete_prefix(key.rsplit("/", 1)[0] + "/"))
    session.add(row)
    session.flush()
    return row


def get(*, session: Session, tenant_id: str, model_id: str) -> ModelRow:
    row = session.get(ModelRow, model_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"model {model_id} does not exist", code="model_not_found", model_id=model_id)
    return row


def list_page(*, session: Session, tenant_id: str, limit: int, cursor: str | None,
              sha256: str | None = None) -> tuple[list[ModelRow], str | None]:
    if sha256 is not None:  # the uploads of these exact bytes: a client reuses one instead of uploading again
        query = select(ModelRow).where(ModelRow.tenant_id == tenant_id, ModelRow.sha256 == sha256)
        return list(session.scalars(query.order_by(ModelRow.created_at.desc(), ModelRow.id.desc()).limit(limit))), None
    return newest_first(session=session, table=ModelRow, tenant_id=tenant_id, limit=limit, cursor=cursor)


def delete(*, session: Session, store: ObjectStore, tenant_id: str, model_id: str) -> None:
    from service.jobs.service import active_jobs_using_model

    row = get(session=session, tenant_id=tenant_id, model_id=model_id)
    if active_jobs_using_model(session=session, model_id=model_id):
        raise Conflict(f"model {model_id} is used by a queued or running job", code="model_in_use", model_id=model_id)
    session.delete(row)
    session.flush()
    after_commit(session, lambda: store.delete_prefix(row.storage_key.rsplit("/", 1)[0] + "/"))
