"""Streamed multipart uploads: the request body goes to a temporary file chunk by chunk, hashed and
counted on the way, and is cut off as soon as it passes the size limit. Nothing is held whole in
memory and nothing oversized is written in full."""

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import Invalid, TooLarge, UnsupportedMediaType

MAX_FIELD_BYTES = 16 * 1024  # plain form fields (a name, a preprocess spec); files go through `file`
MAX_FIELDS = 16
FRAMING_SLACK = 64 * 1024 + MAX_FIELDS * MAX_FIELD_BYTES  # multipart headers and the small fields


@dataclass
class ReceivedUpload:
    path: Path
    filename: str
    size_bytes: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class _Collector:
    """Callbacks for MultipartParser: the `file` part to disk, other parts as short strings."""

    def __init__(self, tmp_dir: Path, max_bytes: int):
        self.max_bytes = max_bytes
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self.file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.digest = hashlib.sha256()
        self.size = 0
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self._headers: dict[str, str] = {}
        self._header_field = b""
        self._header_value = b""
        self._part_name: str | None = None
        self._part_is_file = False
        self._field_buffer = bytearray()
        self.file_parts = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda d, s, e: self._append("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._append("_header_value", d[s:e]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def _append(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def on_part_begin(self) -> None:
        self._headers = {}
        self._part_name = None
        self._part_is_file = False
        self._field_buffer = bytearray()

    def on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        self._part_name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part_is_file = self._part_name == "file"
        if self._part_is_file:
            self.file_parts += 1
            if self.file_parts > 1:
                raise Invalid("send exactly one part named 'file'", code="multiple_files")
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part_is_file:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise TooLarge(f"the upload is larger than the limit of {self.max_bytes} bytes", limit_bytes=self.max_bytes)
            self.digest.update(chunk)
            self.file.write(chunk)
        else:
            self._field_buffer += chunk
            if len(self._field_buffer) > MAX_FIELD_BYTES:
                raise Invalid(f"form field {self._part_name!r} is too long", code="field_too_long")

    def on_part_end(self) -> None:
        if not self._part_is_file and self._part_name:
            if len(self.fields) >= MAX_FIELDS:
                raise Invalid(f"the form has more than {MAX_FIELDS} fields", code="too_many_fields")
            self.fields[self._part_name] = self._field_buffer.decode("utf-8", "replace")


async def receive_upload(request: Request, *, tmp_dir: Path, max_bytes: int) -> ReceivedUpload:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise UnsupportedMediaType("send the file as multipart/form-data with a part named 'file'")
    declared = request.headers.get("content-length")
    # A declared length over the limit is refused before a byte is read (the multipart framing adds
    # a little, hence the slack).
    if declared and declared.isdigit() and int(declared) > max_bytes + FRAMING_SLACK:
        raise TooLarge(f"the upload is larger than the limit of {max_bytes} bytes", limit_bytes=max_bytes)

    tmp_dir.mkdir(parents=True, exist_ok=True)
    collector = _Collector(tmp_dir, max_bytes)
    received = 0
    try:
        parser = MultipartParser(params[b"boundary"], collector.callbacks())
        async for chunk in request.stream():
            # The whole body is bounded, not only the file part.
            received += len(chunk)
            if received > max_bytes + FRAMING_SLACK:
                raise TooLarge(f"the upload is larger than the limit of {max_bytes} bytes", limit_bytes=max_bytes)
            parser.write(chunk)
        parser.finalize()
    except (Invalid, TooLarge):
        collector.file.close()
        collector.path.unlink(missing_ok=True)
        raise
    except Exception as exc:
        collector.file.close()
        collector.path.unlink(missing_ok=True)
        raise Invalid(f"malformed multipart body: {exc}", code="malformed_multipart") from exc
    collector.file.close()
    if collector.filename is None:
        collector.path.unlink(missing_ok=True)
        raise Invalid("the form has no part named 'file'", code="missing_file")
    if collector.size == 0:
        collector.path.unlink(missing_ok=True)
        raise Invalid("the uploaded file is empty", code="empty_file")
    return ReceivedUpload(
        path=collector.path,
        filename=collector.filename,
        size_bytes=collector.size,
        sha256=collector.digest.hexdigest(),
        fields=collector.fields,
    )
