"""Dataset records: create from an upload, read, list, delete."""

import json
from pathlib import Path

from sqlalchemy.orm import Session

from service.config import Settings
from service.datasets.inspect import inspect_dataset
from service.datasets.sandboxed import DatasetBounds, SandboxedDatasetReader
from service.datasets.tables import DatasetRow
from service.errors import Conflict, Invalid, NotFound
from service.ids import clean_name, new_id
from service.pagination import newest_first
from service.storage import ObjectStore, tenant_prefix
from service.tenants import quotas
from service.unit_of_work import after_commit, on_rollback
from service.uploads import ReceivedUpload
from modelpress.spec.configs import PreprocessSpec, parse_preprocess
from modelpress.spec.errors import EngineError


def _preprocess(raw: str | None) -> PreprocessSpec:
    try:
        data = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise Invalid(f"the preprocess field is not JSON: {exc}", code="invalid_preprocess") from exc
    if not isinstance(data, dict):
        raise Invalid("the preprocess field must be a JSON object", code="invalid_preprocess")
    try:
        return parse_preprocess(data)
    except EngineError as exc:
        raise Invalid(exc.message, code=exc.code) from exc


def create(*, session: Session, store: ObjectStore, settings: Settings, tenant_id: str, upload: ReceivedUpload,
           name: str | None, preprocess: str | None = None, reader: SandboxedDatasetReader | None = None) -> DatasetRow:
    # reader: read the upload in a limited child process (the API does); None: in this process.
    spec = _preprocess(preprocess)
    bounds = DatasetBounds(max_bytes=settings.max_dataset_bytes, max_samples=settings.max_dataset_samples,
                           max_image_pixels=settings.max_image_pixels)
    if reader is None:
        info = inspect_dataset(upload.path, max_bytes=bounds.max_bytes, max_samples=bounds.max_samples,
                               max_image_pixels=bounds.max_image_pixels, layout=spec.layout)
    else:
        info = reader.inspect(upload.path, bounds=bounds, layout=spec.layout)
    if info.format == "npz" and (spec.resize or spec.center_crop):
        raise Invalid("resize and center_crop apply to image files; an .npz must already hold the model's size",
                      code="invalid_preprocess")
    dataset_id = new_id("ds")
    key = f"{tenant_prefix(tenant_id)}datasets/{dataset_id}/{'data.npz' if info.format == 'npz' else 'images.zip'}"
    quotas.check_upload(session=session, tenant_id=tenant_id, table=DatasetRow, size_bytes=upload.size_bytes)
    store.put_file(key, upload.path)
    row = DatasetRow(
        id=dataset_id, tenant_id=tenant_id, name=clean_name(name or Path(upload.filename).stem or dataset_id),
        format=info.format, size_bytes=upload.size_bytes, sha256=upload.sha256, storage_key=key,
        count=info.count, shape=info.shape, dtype=info.dtype, layout=info.layout,
        has_labels=info.has_labels, num_classes=info.num_classes, classes=info.classes, labels=info.labels,
        preprocess=spec.model_dump(exclude_defaults=True),
    )
    # The row failed (now or at the request's commit): leave no orphan object behind.
    on_rollback(session, lambda: store.delete_prefix(key.rsplit("/", 1)[0] + "/"))
    session.add(row)
    session.flush()
    return row


def get(*, session: Session, tenant_id: str, dataset_id: str) -> DatasetRow:
    row = session.get(DatasetRow, dataset_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"dataset {dataset_id} does not exist", code="dataset_not_found", dataset_id=dataset_id)
    return row


def list_page(*, session: Session, tenant_id: str, limit: int, cursor: str | None) -> tuple[list[DatasetRow], str | None]:
    return newest_first(session=session, table=DatasetRow, tenant_id=tenant_id, limit=limit, cursor=cursor)


def delete(*, session: Session, store: ObjectStore, tenant_id: str, dataset_id: str) -> None:
    from service.jobs.service import active_jobs_using_dataset

    row = get(session=session, tenant_id=tenant_id, dataset_id=dataset_id)
    if active_jobs_using_dataset(session=session, dataset_id=dataset_id):
        raise Conflict(f"dataset {dataset_id} is used by a queued or running job", code="dataset_in_use", dataset_id=dataset_id)
    session.delete(row)
    session.flush()
    after_commit(session, lambda: store.delete_prefix(row.storage_key.rsplit("/", 1)[0] + "/"))
