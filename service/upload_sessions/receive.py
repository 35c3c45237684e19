"""One part's body, streamed to a temporary file: hashed on the way, cut off one byte past the size
the part must have, and checked against the checksum the client sent. Memory holds one chunk of
the request at a time, whatever the part size."""

import base64
import binascii
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from starlette.requests import ClientDisconnect

from service.errors import Invalid


@dataclass
class ExpectedChecksum:
    md5: bytes | None = None
    sha256: bytes | None = None


@dataclass
class ReceivedPart:
    path: Path
    size_bytes: int
    sha256: str

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _decode(value: str, length: int) -> bytes | None:
    value = value.strip()
    if len(value) == 2 * length:
        try:
            return bytes.fromhex(value)
        except ValueError:
            return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == length else None


def expected_checksum(*, content_md5: str | None, checksum_sha256: str | None) -> ExpectedChecksum:
    """`Content-MD5` (base64, RFC 1864) or `x-checksum-sha256` (hex or base64): at least one, so a
    part corrupted on the way is refused rather than assembled."""
    expected = ExpectedChecksum()
    if content_md5:
        expected.md5 = _decode(content_md5, 16)
        if expected.md5 is None:
            raise Invalid("Content-MD5 must be the base64 of a 16-byte MD5 digest", code="part_checksum_required")
    if checksum_sha256:
        expected.sha256 = _decode(checksum_sha256, 32)
        if expected.sha256 is None:
            raise Invalid("x-checksum-sha256 must be a SHA-256 digest in hex or base64", code="part_checksum_required")
    if expected.md5 is None and expected.sha256 is None:
        raise Invalid("send each part with a Content-MD5 or x-checksum-sha256 header", code="part_checksum_required")
    return expected


def _size_mismatch(number: int, expected: int, got: str) -> Invalid:
    return Invalid(f"part {number} must be {expected} bytes, got {got}", code="part_size_mismatch",
                   part_number=number, expected_bytes=expected)


async def receive_part(request: Request, *, tmp_dir: Path, number: int, expected_bytes: int,
                       checksum: ExpectedChecksum) -> ReceivedPart:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) != expected_bytes:
        raise _size_mismatch(number, expected_bytes, f"a Content-Length of {declared}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="part-")
    path = Path(name)
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False) if checksum.md5 else None
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > expected_bytes:
                    raise _size_mismatch(number, expected_bytes, "more")
                sha256.update(chunk)
                if md5 is not None:
                    md5.update(chunk)
                out.write(chunk)
    except ClientDisconnect as exc:
        # The connection was cut mid-part: nothing is recorded, the client sends the part again.
        path.unlink(missing_ok=True)
        raise _size_mismatch(number, expected_bytes, f"{size} before the connection ended") from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size != expected_bytes:
        path.unlink(missing_ok=True)
        raise _size_mismatch(number, expected_bytes, f"{size}")
    if (checksum.sha256 is not None and sha256.digest() != checksum.sha256) or (
            md5 is not None and md5.digest() != checksum.md5):
        path.unlink(missing_ok=True)
        raise Invalid(f"part {number} does not match its checksum: it was changed on the way; send it again",
                      code="part_checksum_mismatch", part_number=number)
    return ReceivedPart(path=path, size_bytes=size, sha256=sha256.hexdigest())
