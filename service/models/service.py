"""Model records: create from an upload, read, list, change the task, delete. Keyword-only, no HTTP."""

import json
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Conflict, Invalid, NotFound
from service.ids import clean_name, new_id
from service.models.inspect import inspect_model
from service.models.sandboxed import SandboxedModelReader
from service.models.tables import ModelRow
from service.pagination import newest_first
from service.storage import ObjectStore, tenant_prefix
from service.tenants import quotas
from service.unit_of_work import after_commit, on_rollback
from service.uploads import ReceivedUpload
from modelpress.spec.configs.task import misfit, parse_task

FILE_NAMES = {"onnx": "model.onnx", "torch_export": "model.pt2", "torchscript": "model.pt"}


def checked_task(task: dict | None, outputs: list[dict], *, model: str) -> dict | None:
    """A task (a job's or an upload's) with every default filled in; refused when it is not a task,
    or when it cannot read the outputs as recorded at upload (unknown dimensions are let through:
    the worker checks again on the real shapes). `model` names the model in the message."""
    if task is None:
        return None
    try:
        parsed = parse_task(task)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'task'}: {e['msg']}" for e in exc.errors())
        raise Invalid(f"task: {problems}", code="invalid_task") from exc
    problem = misfit(parsed, [output.get("shape") for output in outputs or []])
    if problem is not None:
        raise Invalid(f"the task does not fit {model}: {problem}", code="task_does_not_fit_model")
    return parsed.model_dump()


def _task_field(text: str | None) -> dict | None:
    """The `task` form field: a task as JSON (its length is bounded as every form field's is)."""
    if text is None or not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Invalid(f"task: not JSON: {exc}", code="invalid_task") from exc


def create(*, session: Session, store: ObjectStore, tenant_id: str, upload: ReceivedUpload, name: str | None,
           max_unpacked_bytes: int, reader: SandboxedModelReader | None = None, task: str | None = None) -> ModelRow:
    # reader: read the upload in a limited child process (the API does); None: in this process.
    # task: the `task` form field's text (JSON), checked against the outputs just read.
    if reader is None:
        info = inspect_model(upload.path, max_unpacked_bytes=max_unpacked_bytes)
    else:
        info = reader.inspect(upload.path, max_unpacked_bytes=max_unpacked_bytes)
    checked = checked_task(_task_field(task), info.outputs, model="the uploaded model")
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
        task=checked,
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


def set_task(*, session: Session, tenant_id: str, model_id: str, task: dict | None) -> ModelRow:
    """The model's task replaced (checked against its outputs as at upload) or cleared (None).
    A job copies its task when it is accepted (service/jobs/service.py `_task`), so jobs already
    accepted are not changed."""
    row = get(session=session, tenant_id=tenant_id, model_id=model_id)
    row.task = checked_task(task, row.outputs, model=f"model {model_id}")
    session.flush()
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
