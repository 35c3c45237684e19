"""Upload sessions: create, receive parts, list them, complete, abort, expire. Keyword-only, no HTTP.

A session's parts lie in object storage under `tenants/<t>/uploads/<id>/parts/`; complete joins
them into one temporary file (streamed, hashed) and hands it to `models.service.create` or
`datasets.service.create`, the functions a single-request upload calls: the same sniffing,
sandboxed parsing, limits and quota check.
"""

import hashlib
import math
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from modelpress.spec.errors import DomainError
from service.config import Settings
from service.datasets import service as datasets
from service.datasets.tables import DatasetRow
from service.db import utcnow
from service.errors import Conflict, Invalid, NotFound, QuotaExceeded, TooLarge
from service.ids import clean_name, new_id
from service.models import service as models
from service.models.tables import ModelRow
from service.storage import ObjectStore, tenant_prefix
from service.tenants import quotas
from service.upload_sessions.receive import ReceivedPart
from service.upload_sessions.schemas import UploadCreate, UploadPartRead, UploadRead
from service.upload_sessions.tables import UploadPartRow, UploadSessionRow
from service.uploads import ReceivedUpload

OPEN, COMPLETING, COMPLETED, FAILED, ABORTED, EXPIRED = "open", "completing", "completed", "failed", "aborted", "expired"
TABLES = {"model": ModelRow, "dataset": DatasetRow}
SWEEP_BATCH = 20  # expired sessions cleaned per new session: the sweep's cost stays bounded
MAX_MISSING_LISTED = 100


class UploadExpired(DomainError):
    status, code, title = 410, "upload_expired", "Gone"


def part_key(row: UploadSessionRow, number: int) -> str:
    return f"{row.storage_prefix}parts/{number:05d}"


def expected_part_bytes(row: UploadSessionRow, number: int) -> int:
    if not 1 <= number <= row.part_count:
        raise Invalid(f"part numbers of this upload run from 1 to {row.part_count}", code="part_number_out_of_range",
                      part_count=row.part_count)
    return row.part_bytes if number < row.part_count else row.size_bytes - row.part_bytes * (row.part_count - 1)


def _part_size(*, settings: Settings, size_bytes: int, asked: int | None) -> int:
    part_bytes = asked or settings.upload_part_bytes
    if not settings.upload_min_part_bytes <= part_bytes <= settings.upload_max_part_bytes:
        raise Invalid(f"part_bytes must be between {settings.upload_min_part_bytes} and {settings.upload_max_part_bytes}",
                      code="invalid_part_size")
    # A large file with the default part size: grow the parts rather than refuse the file.
    if asked is None:
        part_bytes = max(part_bytes, math.ceil(size_bytes / settings.upload_max_parts))
    if math.ceil(size_bytes / part_bytes) > settings.upload_max_parts:
        raise Invalid(f"{size_bytes} bytes in parts of {part_bytes} is more than {settings.upload_max_parts} parts",
                      code="invalid_part_size")
    return part_bytes


def create(*, session: Session, store: ObjectStore, settings: Settings, tenant_id: str, spec: UploadCreate) -> UploadSessionRow:
    sweep_expired(session=session, store=store)
    limit = settings.upload_session_max_bytes
    if spec.size_bytes > limit:
        raise TooLarge(f"the upload is larger than the limit of {limit} bytes", limit_bytes=limit)
    part_bytes = _part_size(settings=settings, size_bytes=spec.size_bytes, asked=spec.part_bytes)
    # The bytes of sessions still open count against the stored-bytes quota: parts are stored
    # bytes, and a tenant must not fill the storage with sessions it never completes.
    pending = session.scalar(select(func.coalesce(func.sum(UploadSessionRow.size_bytes), 0)).where(
        UploadSessionRow.tenant_id == tenant_id, UploadSessionRow.status.in_([OPEN, COMPLETING])))
    quotas.check_upload(session=session, tenant_id=tenant_id, table=TABLES[spec.kind],
                        size_bytes=spec.size_bytes + int(pending or 0))
    open_sessions = session.scalar(select(func.count()).select_from(UploadSessionRow).where(
        UploadSessionRow.tenant_id == tenant_id, UploadSessionRow.status.in_([OPEN, COMPLETING]))) or 0
    if open_sessions >= settings.max_open_upload_sessions:
        raise QuotaExceeded(f"this tenant already has {open_sessions} open upload sessions; complete or abort one",
                            quota="open_upload_sessions", limit=settings.max_open_upload_sessions)
    upload_id = new_id("upl")
    now = utcnow()
    fields = {k: v for k, v in {"name": spec.name, "preprocess": spec.preprocess, "task": spec.task}.items() if v is not None}
    row = UploadSessionRow(
        id=upload_id, tenant_id=tenant_id, kind=spec.kind, status=OPEN, filename=clean_name(spec.filename),
        fields=fields, size_bytes=spec.size_bytes, sha256=spec.sha256, part_bytes=part_bytes,
        part_count=math.ceil(spec.size_bytes / part_bytes), storage_prefix=f"{tenant_prefix(tenant_id)}uploads/{upload_id}/",
        created_at=now, updated_at=now, expires_at=now + timedelta(seconds=settings.upload_session_ttl_s),
    )
    session.add(row)
    session.flush()
    return row


def get(*, session: Session, store: ObjectStore, tenant_id: str, upload_id: str) -> UploadSessionRow:
    row = session.get(UploadSessionRow, upload_id, populate_existing=True)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"upload {upload_id} does not exist", code="upload_not_found", upload_id=upload_id)
    if row.status == OPEN and row.expires_at <= utcnow():
        _expire(session=session, store=store, row=row)
    if row.status == EXPIRED:
        raise UploadExpired(f"upload {upload_id} expired; its parts are deleted: start a new one", upload_id=upload_id)
    return row


def parts(*, session: Session, upload_id: str) -> list[UploadPartRow]:
    return list(session.scalars(select(UploadPartRow).where(UploadPartRow.session_id == upload_id).order_by(UploadPartRow.number)))


def read(*, session: Session, row: UploadSessionRow) -> UploadRead:
    received = parts(session=session, upload_id=row.id)
    return UploadRead(
        id=row.id, kind=row.kind, status=row.status, filename=row.filename, size_bytes=row.size_bytes,
        sha256=row.sha256, part_bytes=row.part_bytes, part_count=row.part_count,
        parts=[UploadPartRead.model_validate(p) for p in received], received_bytes=sum(p.size_bytes for p in received),
        result_id=row.result_id, error=row.error, created_at=row.created_at, expires_at=row.expires_at,
    )


def _require_open(row: UploadSessionRow) -> None:
    if row.status != OPEN:
        raise Conflict(f"upload {row.id} is {row.status}: it takes no more parts", code="upload_not_open",
                       upload_id=row.id, upload_status=row.status)


def open_for_part(*, session: Session, store: ObjectStore, tenant_id: str, upload_id: str, number: int) -> tuple[UploadSessionRow, int]:
    """The session a part is for and the size that part must have, checked before its body is read."""
    row = get(session=session, store=store, tenant_id=tenant_id, upload_id=upload_id)
    _require_open(row)
    expected = expected_part_bytes(row, number)
    session.rollback()  # no transaction held open while the body streams in
    return row, expected


def store_part(*, session: Session, store: ObjectStore, tenant_id: str, upload_id: str, number: int,
               part: ReceivedPart) -> UploadPartRow:
    row = get(session=session, store=store, tenant_id=tenant_id, upload_id=upload_id)
    _require_open(row)  # again: it may have been completed or aborted while the body arrived
    # Sending a part again replaces it (a retry whose answer was lost); it was checked the same way.
    store.adopt_file(part_key(row, number), part.path)
    session.merge(UploadPartRow(session_id=row.id, number=number, tenant_id=tenant_id, size_bytes=part.size_bytes,
                                sha256=part.sha256, received_at=utcnow()))
    session.execute(update(UploadSessionRow).where(UploadSessionRow.id == row.id).values(updated_at=utcnow()))
    session.commit()
    return session.get(UploadPartRow, (row.id, number))


def _missing_parts(row: UploadSessionRow, received: list[UploadPartRow]) -> list[int]:
    have = {p.number for p in received if p.size_bytes == expected_part_bytes(row, p.number)}
    return [n for n in range(1, row.part_count + 1) if n not in have]


def _claim_for_completion(*, session: Session, settings: Settings, row: UploadSessionRow) -> bool:
    # One complete at a time: a conditional UPDATE, as job claims are. A completion whose process
    # died is taken over once it is older than any model parse could run.
    stale_before = utcnow() - timedelta(seconds=settings.model_parse_timeout_s + 600)
    claimed = session.execute(
        update(UploadSessionRow)
        .where(UploadSessionRow.id == row.id, or_(UploadSessionRow.status == OPEN, (UploadSessionRow.status == COMPLETING)
                                                  & (UploadSessionRow.updated_at < stale_before)))
        .values(status=COMPLETING, updated_at=utcnow())
    ).rowcount
    session.commit()
    return claimed == 1


def _set_status(session: Session, upload_id: str, status: str, *, discard: bool = True, **values) -> None:
    if discard:
        session.rollback()  # whatever the failed create left in the session
    session.execute(update(UploadSessionRow).where(UploadSessionRow.id == upload_id)
                    .values(status=status, updated_at=utcnow(), **values))
    session.commit()


def _assemble(*, store: ObjectStore, settings: Settings, row: UploadSessionRow, sha256: str | None) -> ReceivedUpload:
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=settings.tmp_dir, prefix="assembled-")
    path = Path(name)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for number in range(1, row.part_count + 1):
                for chunk in store.iter_chunks(part_key(row, number)):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    upload = ReceivedUpload(path=path, filename=row.filename, size_bytes=size, sha256=digest.hexdigest(),
                            fields=dict(row.fields or {}))
    if size != row.size_bytes:
        upload.discard()
        raise Invalid(f"the parts hold {size} bytes, the upload declared {row.size_bytes}", code="upload_checksum_mismatch")
    for declared in {row.sha256, sha256} - {None}:
        if upload.sha256 != declared:
            upload.discard()
            raise Invalid(f"the assembled file's sha256 is {upload.sha256}, the upload declared {declared}",
                          code="upload_checksum_mismatch", sha256=upload.sha256)
    return upload


def _create_resource(*, session: Session, store: ObjectStore, settings: Settings, row: UploadSessionRow,
                     upload: ReceivedUpload, readers: tuple) -> ModelRow | DatasetRow:
    model_reader, dataset_reader = readers
    limit = settings.upload_session_max_bytes
    if row.kind == "model":
        return models.create(session=session, store=store, tenant_id=row.tenant_id, upload=upload,
                             name=upload.fields.get("name"), task=upload.fields.get("task"), max_unpacked_bytes=4 * limit,
                             reader=model_reader)
    # The dataset checks bound the archive by max_dataset_bytes: this path's own limit replaces it.
    session_settings = settings.model_copy(update={"max_dataset_bytes": max(settings.max_dataset_bytes, limit)})
    return datasets.create(session=session, store=store, settings=session_settings, tenant_id=row.tenant_id,
                           upload=upload, name=upload.fields.get("name"), preprocess=upload.fields.get("preprocess"),
                           reader=dataset_reader)


def _resource(session: Session, row: UploadSessionRow) -> ModelRow | DatasetRow:
    resource = session.get(TABLES[row.kind], row.result_id)
    if resource is None:  # deleted since: the upload's result is gone
        raise NotFound(f"the {row.kind} {row.result_id} this upload made was deleted", code=f"{row.kind}_not_found")
    return resource


def complete(*, session: Session, store: ObjectStore, settings: Settings, tenant_id: str,
             upload_id: str, sha256: str | None = None, readers: tuple = (None, None)) -> tuple[ModelRow | DatasetRow, bool]:
    """The model or dataset the upload makes, and whether this call made it (a repeated complete,
    say after a lost answer, returns the first one's result). `readers`: the sandboxed model and
    dataset readers the single-request uploads use (None: read in this process)."""
    row = get(session=session, store=store, tenant_id=tenant_id, upload_id=upload_id)
    if row.status == COMPLETED:
        return _resource(session, row), False
    _require_open(row)
    missing = _missing_parts(row, parts(session=session, upload_id=row.id))
    if missing:
        raise Conflict(f"{len(missing)} of {row.part_count} parts are missing: send them, then complete",
                       code="upload_incomplete", missing_parts=missing[:MAX_MISSING_LISTED])
    if not _claim_for_completion(session=session, settings=settings, row=row):
        row = get(session=session, store=store, tenant_id=tenant_id, upload_id=upload_id)
        if row.status == COMPLETED:
            return _resource(session, row), False
        _require_open(row)
        # Open again already: another request's completion just gave up. Say "completing" so a
        # client waits and tries once more rather than giving up.
        raise Conflict(f"upload {row.id} is being completed by another request", code="upload_not_open",
                       upload_id=row.id, upload_status=COMPLETING)
    upload = None
    try:
        upload = _assemble(store=store, settings=settings, row=row, sha256=sha256)
        resource = _create_resource(session=session, store=store, settings=settings, row=row, upload=upload,
                                    readers=readers)
    except QuotaExceeded:
        _set_status(session, row.id, OPEN)  # the tenant may free space and complete again
        raise
    except DomainError as exc:
        # The file is refused (format, hostile content, checksum): the parts would make it again.
        _set_status(session, row.id, FAILED, error={"code": exc.code, "detail": exc.message})
        _delete_parts(session=session, store=store, row=row)
        raise
    except BaseException:
        _set_status(session, row.id, OPEN)
        raise
    finally:
        if upload is not None:
            upload.discard()
    # Committed with the session's status: the new model or dataset and its row are one transaction.
    _set_status(session, row.id, COMPLETED, discard=False, result_id=resource.id)
    _delete_parts(session=session, store=store, row=row)
    return resource, True


def abort(*, session: Session, store: ObjectStore, tenant_id: str, upload_id: str) -> None:
    row = get(session=session, store=store, tenant_id=tenant_id, upload_id=upload_id)
    if row.status == COMPLETING:
        raise Conflict(f"upload {upload_id} is being completed", code="upload_not_open", upload_id=row.id,
                       upload_status=row.status)
    if row.status == OPEN:
        _set_status(session, row.id, ABORTED)
    _delete_parts(session=session, store=store, row=row)


def _delete_parts(*, session: Session, store: ObjectStore, row: UploadSessionRow) -> None:
    session.execute(delete(UploadPartRow).where(UploadPartRow.session_id == row.id))
    session.commit()
    store.delete_prefix(row.storage_prefix)


def _expire(*, session: Session, store: ObjectStore, row: UploadSessionRow) -> None:
    _set_status(session, row.id, EXPIRED)
    _delete_parts(session=session, store=store, row=row)
    session.refresh(row)


def sweep_expired(*, session: Session, store: ObjectStore, batch: int = SWEEP_BATCH) -> int:
    """Expire up to `batch` sessions past their time (of any tenant) and delete their parts; run
    on every new session, so abandoned parts go without a scheduler."""
    rows = list(session.scalars(select(UploadSessionRow).where(
        UploadSessionRow.status == OPEN, UploadSessionRow.expires_at <= utcnow()).limit(batch)))
    for row in rows:
        _expire(session=session, store=store, row=row)
    return len(rows)
