"""Resumable uploads for the client: a large file goes up in checksummed parts through an upload
session (POST /v1/uploads, PUT .../parts/{n}, POST .../complete). A cut connection costs the part
in flight: the client asks the server which parts it holds and sends the others.

Memory: one part at a time (the server's part size, 16 MiB by default), read from the file at its
offset, so any file size uploads with the same footprint.
"""

import base64
import hashlib
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from modelpress.errors import ModelpressError, ServerUnreachable

UploadProgress = Callable[[int, int], None]  # (bytes the server holds, file size)
# A part the server refused as changed on the way, or a connection cut mid-part: sent again.
RESENT_CODES = {"part_checksum_mismatch", "part_size_mismatch"}
COMPLETE_TIMEOUT_S = 900.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ResumableUpload:
    """One file through one upload session. `client` is a `modelpress.Client` (its HTTP connection,
    retry policy and error parsing)."""

    def __init__(self, client, *, kind: str, file: Path, name: str | None = None, part_bytes: int | None = None,
                 progress: UploadProgress | None = None, fields: dict[str, str] | None = None):
        self.client, self.kind, self.file, self.name = client, kind, file, name
        self.fields = dict(fields or {})  # the other form fields a single-request upload would send (task)
        self.part_bytes, self.progress = part_bytes, progress
        self.size = file.stat().st_size
        self.upload: dict = {}
        self.received: set[int] = set()
        self.resumes = 0  # how many times a cut connection or a refused part sent the client back to the list

    def run(self) -> dict:
        # The whole file's sha256, computed on another thread while the parts go up (hashlib lets
        # go of the GIL), is sent with complete: the server refuses a file that is not this one.
        digest: dict[str, str] = {}
        hasher = threading.Thread(target=lambda: digest.update(sha256=file_sha256(self.file)), daemon=True)
        hasher.start()
        body = {"kind": self.kind, "filename": self.file.name, "size_bytes": self.size}
        if self.name:
            body["name"] = self.name
        body.update(self.fields)
        if self.part_bytes:
            body["part_bytes"] = self.part_bytes
        self.upload = self.client._json("POST", "/v1/uploads", json=body)
        self._send_parts()
        hasher.join()
        if "sha256" not in digest:
            raise ModelpressError("file_unreadable", f"{self.file} could not be read to the end")
        return self._complete(digest["sha256"])

    # --- parts ------------------------------------------------------------------------------------

    def _part_size(self, number: int) -> int:
        part_bytes, count = self.upload["part_bytes"], self.upload["part_count"]
        return part_bytes if number < count else self.size - part_bytes * (count - 1)

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(sum(self._part_size(n) for n in self.received), self.size)

    def _refresh(self) -> None:
        """Which parts the server holds: after a failure, the only truth worth trusting."""
        self.upload = self.client._json("GET", f"/v1/uploads/{self.upload['id']}")
        self.received = {p["number"] for p in self.upload["parts"]}

    def _send_parts(self) -> None:
        failures_in_a_row = 0
        self._report()
        with open(self.file, "rb") as handle:
            while missing := [n for n in range(1, self.upload["part_count"] + 1) if n not in self.received]:
                number = missing[0]
                handle.seek((number - 1) * self.upload["part_bytes"])
                data = handle.read(self._part_size(number))
                try:
                    self._put(number, data)
                except (httpx.TransportError, _Resend) as exc:
                    failures_in_a_row += 1
                    if failures_in_a_row > self.client.retries:
                        raise ServerUnreachable("upload_failed", f"part {number} of {self.file} kept failing: {exc}") from exc
                    self.resumes += 1
                    time.sleep(self.client.backoff * (2 ** (failures_in_a_row - 1)) * (0.5 + random.random()))
                    self._refresh()
                    self._report()
                    continue
                failures_in_a_row = 0
                self.received.add(number)
                self._report()

    def _put(self, number: int, data: bytes) -> None:
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        response = self.client.http.put(
            f"/v1/uploads/{self.upload['id']}/parts/{number}", content=data,
            headers={"Content-Type": "application/octet-stream", "x-checksum-sha256": checksum})
        if response.status_code in (429, 500, 502, 503, 504):
            raise _Resend(f"HTTP {response.status_code}")
        try:
            self.client._parse(response)
        except ModelpressError as exc:
            if exc.code in RESENT_CODES:
                raise _Resend(exc.message) from exc
            raise

    # --- complete ---------------------------------------------------------------------------------

    def _complete(self, sha256: str) -> dict:
        path = f"/v1/uploads/{self.upload['id']}/complete"
        # Completing parses the whole file (in a sandbox, up to the server's parse timeout): longer
        # than an ordinary request may take.
        timeout = httpx.Timeout(COMPLETE_TIMEOUT_S, connect=10.0)
        deadline = time.monotonic() + COMPLETE_TIMEOUT_S
        resend_rounds = 0
        while True:
            try:
                # Safe to repeat: once completed, the server answers with the same model or dataset.
                response = self.client._send(
                    lambda: self.client.http.post(path, json={"sha256": sha256}, timeout=timeout), idempotent=True)
                return self.client._parse(response)
            except ModelpressError as exc:
                if exc.code == "upload_incomplete" and resend_rounds < self.client.retries:
                    resend_rounds += 1
                    self._refresh()  # parts the server does not hold after all: send them
                    self._send_parts()
                    continue
                if (exc.code == "upload_not_open" and exc.problem.get("upload_status") == "completing"
                        and time.monotonic() < deadline):
                    time.sleep(2.0)  # an earlier try whose answer was lost is still at it
                    continue
                raise


class _Resend(Exception):
    pass


class UploadProgressBar:
    """`modelpress` on a terminal: a line redrawn as the parts arrive."""

    def __init__(self, stream=None, width: int = 30, label: str = "upload"):
        self.stream = stream or sys.stderr
        self.width, self.label = width, label
        self.started = time.monotonic()
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_percent = -1

    def __call__(self, done: int, total: int) -> None:
        if done == 0:  # a new file (compress uploads a model, then its datasets)
            self.started, self._last_percent = time.monotonic(), -1
        fraction = done / total if total else 1.0
        percent = int(fraction * 100)
        if not self.interactive and percent // 10 == self._last_percent // 10 and done < total:
            return  # a log, not a terminal: a line per 10 %
        self._last_percent = percent
        elapsed = max(time.monotonic() - self.started, 1e-6)
        filled = int(fraction * self.width)
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {percent:3d}% "
                f"{done / 2**20:,.1f}/{total / 2**20:,.1f} MiB {done / 2**20 / elapsed:,.1f} MiB/s")
        self.stream.write(("\r" + line) if self.interactive else line + os.linesep)
        if self.interactive and done >= total:
            self.stream.write(os.linesep)
        self.stream.flush()
