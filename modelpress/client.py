"""A typed client for the modelpress API, built on httpx.

    from modelpress import Client
    client = Client()                      # MODELPRESS_URL / MODELPRESS_API_KEY, or arguments
    job = client.submit(client.upload_model("resnet.onnx"), [{"type": "quantize", "params": {}}],
                        data={"calibration": client.upload_dataset("calib.npz")})
    job.wait()                             # raises JobFailed (GuardNotMet, FidelityFloorNotMet) on failure
    job.download("model.onnx", to="out/model.onnx")

Transient failures (connection errors, 429, 5xx) are retried a bounded number of times with
backoff; every POST and PATCH carries a fresh `Idempotency-Key`, reused by its retries, so a retried submit
never starts a second job. Waiting follows the job's event stream (SSE) and falls back to polling
with backoff; downloads are streamed and verified against the sha256.
Files above `upload_session_threshold` go up in resumable, checksummed parts (`modelpress.resumable`).
"""

import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelpress.errors import ModelpressError, ServerUnreachable
# Job and ProgressBar live in modelpress/job.py; STATUSES and ProgressBar are imported from here too.
from modelpress.job import STATUSES, Job, ProgressBar  # noqa: F401
from modelpress.resumable import ResumableUpload, UploadProgress

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = {429, 500, 502, 503, 504}
# Files above this go up in resumable parts (modelpress/resumable.py); smaller ones in one request.
UPLOAD_SESSION_THRESHOLD = 32 * 1024 * 1024


class _RetryableStatus(Exception):
    pass


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def _key_in_use(response: httpx.Response) -> bool:
    if response.status_code != 409 or "json" not in response.headers.get("content-type", ""):
        return False
    try:
        return response.json().get("code") == "idempotency_key_in_use"
    except ValueError:
        return False


@dataclass
class Model:
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, body: dict) -> "Model":
        return cls(body["id"], body["name"], body["format"], body["size_bytes"], body["sha256"], body)

    @property
    def task(self) -> dict[str, Any] | None:
        """The task given at upload (defaults filled in), or None: each job's is inferred."""
        return self.raw.get("task")


@dataclass
class Dataset:
    id: str
    name: str
    count: int
    shape: list[int]
    has_labels: bool
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, body: dict) -> "Dataset":
        return cls(body["id"], body["name"], body["count"], body["shape"], body["has_labels"], body)


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 4, backoff: float = 0.5, transport: httpx.BaseTransport | None = None,
                 upload_session_threshold: int | None = None, upload_progress: UploadProgress | None = None):
        self.base_url = (base_url or os.environ.get("MODELPRESS_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key or os.environ.get("MODELPRESS_API_KEY")
        headers = {"User-Agent": "modelpress-client/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        if upload_session_threshold is None:
            upload_session_threshold = int(os.environ.get("MODELPRESS_UPLOAD_SESSION_THRESHOLD") or UPLOAD_SESSION_THRESHOLD)
        self.upload_session_threshold, self.upload_progress = upload_session_threshold, upload_progress
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- resources --------------------------------------------------------------------------------

    def upload_model(self, path: str | os.PathLike, name: str | None = None,
                     task: Mapping[str, Any] | str | None = None) -> Model:
        """`task`: what the model is for, a task body or a type name ("detection"); the model's
        jobs use it unless they give their own. None: each job's task is inferred."""
        fields = {}
        if task is not None:
            fields["task"] = json.dumps(_task_body(task))
        return Model.from_json(self._upload("/v1/models", Path(path), name, fields))

    def model_for_file(self, path: str | os.PathLike, name: str | None = None) -> Model:
        """The model already uploaded from a file with these bytes (same sha256), else a new upload:
        compressing the same file again does not store another copy."""
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        found = self._json("GET", "/v1/models", params={"sha256": digest.hexdigest(), "limit": 1})["items"]
        return Model.from_json(found[0]) if found else self.upload_model(path, name=name)

    def update_model(self, model_id: str, *, task: Mapping[str, Any] | str | None) -> Model:
        """Change the model's task (a task body or a type name), or clear it with None (its jobs
        then infer theirs). Checked as at upload; jobs already accepted keep their task."""
        body = {"task": None if task is None else _task_body(task)}
        return Model.from_json(self._json("PATCH", f"/v1/models/{model_id}", json=body))

    def upload_dataset(self, path: str | os.PathLike, name: str | None = None) -> Dataset:
        return Dataset.from_json(self._upload("/v1/datasets", Path(path), name))

    def model(self, model_id: str) -> Model:
        return Model.from_json(self._json("GET", f"/v1/models/{model_id}"))

    def models(self, limit: int = 50) -> Iterator[Model]:
        for body in self._pages("/v1/models", limit):
            yield Model.from_json(body)

    def dataset(self, dataset_id: str) -> Dataset:
        return Dataset.from_json(self._json("GET", f"/v1/datasets/{dataset_id}"))

    def submit(self, model: "str | Model", steps: Sequence[Mapping[str, Any]] | None = None,
               data: Mapping[str, "str | Dataset | dict | None"] | None = None, *, preset: str | None = None,
               task: Mapping[str, Any] | str | None = None, floor: str | Mapping[str, float] | None = None) -> Job:
        """Steps, or a named preset (see `presets()`), e.g. submit(model, preset="edge-int8", data=...).
        `task`: what the model is for, a task body or a type name ("detection"); None: inferred.
        `floor`: the safety floor, "default" (the server's default), "off", or {"metric": bound}."""
        body = {
            "model_id": model.id if isinstance(model, Model) else model,
            "data": {role: (d.id if isinstance(d, Dataset) else d) for role, d in (data or {}).items() if d is not None},
        }
        if preset is not None:
            body["preset"] = preset
        if steps is not None:
            body["steps"] = [dict(step) for step in steps]
        if task is not None:
            body["task"] = _task_body(task)
        if floor is not None:
            body["floor"] = floor if isinstance(floor, str) else dict(floor)
        return Job(self, self._json("POST", "/v1/jobs", json=body))

    def stream_timeout(self, deadline: float | None) -> httpx.Timeout:
        """An event stream's timeouts: reads wait past the server's keep-alives (15 s), and no
        longer than the caller's deadline."""
        read = max(self.timeout, 30.0)
        if deadline is not None:
            read = max(0.1, min(read, deadline - time.monotonic()))
        return httpx.Timeout(self.timeout, read=read)

    def presets(self) -> list[dict]:
        return self._json("GET", "/v1/presets")

    def job(self, job_id: str) -> Job:
        return Job(self, {"id": job_id}).refresh()

    def jobs(self, status: str | None = None, limit: int = 50) -> Iterator[Job]:
        """Jobs newest first, as summaries (see `Job`): one request per `limit` jobs."""
        for body in self._pages("/v1/jobs", limit, status=status):
            yield Job(self, body)

    # --- webhooks (verify deliveries with modelpress.webhooks.verify) ------------------------------

    def create_webhook(self, url: str, event_types: Sequence[str] | None = None, *, secret: str | None = None,
                       description: str = "") -> dict:
        """Register an endpoint; the answer's `secret` is shown this once."""
        body: dict[str, Any] = {"url": url, "description": description}
        if event_types is not None:
            body["event_types"] = list(event_types)
        if secret is not None:
            body["secret"] = secret
        return self._json("POST", "/v1/webhooks", json=body)

    def webhooks(self) -> list[dict]:
        return self._json("GET", "/v1/webhooks")["items"]

    def delete_webhook(self, webhook_id: str) -> None:
        self._json("DELETE", f"/v1/webhooks/{webhook_id}")

    def webhook_deliveries(self, webhook_id: str, limit: int = 50) -> Iterator[dict]:
        yield from self._pages(f"/v1/webhooks/{webhook_id}/deliveries", limit)

    def resend_delivery(self, webhook_id: str, delivery_id: str) -> dict:
        return self._json("POST", f"/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/resend")

    # --- transport --------------------------------------------------------------------------------

    def _pages(self, path: str, limit: int, **params) -> Iterator[dict]:
        cursor = None
        while True:
            query = {"limit": min(limit, 200), **{k: v for k, v in params.items() if v}}
            if cursor:
                query["cursor"] = cursor
            page = self._json("GET", path, params=query)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def _upload(self, path: str, file: Path, name: str | None, fields: dict[str, str] | None = None) -> dict:
        if not file.is_file():
            raise ModelpressError("file_not_found", f"{file} is not a file")
        if file.stat().st_size > self.upload_session_threshold:
            kind = "model" if path == "/v1/models" else "dataset"
            return ResumableUpload(self, kind=kind, file=file, name=name, progress=self.upload_progress, fields=fields).run()

        key = new_idempotency_key()
        # One boundary for every try: a retry sends the same bytes, so the server sees the same request.
        headers = {"Idempotency-Key": key, "Content-Type": f"multipart/form-data; boundary={key.replace('-', '')}"}

        def send():
            with open(file, "rb") as handle:  # reopened per try: a retry resends from the start
                data = {"name": name} if name else {}
                return self.http.post(path, files={"file": (file.name, handle)}, data={**data, **(fields or {})} or None,
                                      headers=headers)

        return self._parse(self._send(send, idempotent=False, keyed=True))

    def _json(self, method: str, path: str, **kwargs) -> dict:
        if method in ("POST", "PATCH"):
            # A fresh key per call, the same for its retries: the server answers a retry of a POST
            # (or PATCH) that already ran with that first answer instead of running it again.
            kwargs["headers"] = {"Idempotency-Key": new_idempotency_key(), **kwargs.get("headers", {})}
        keyed = "Idempotency-Key" in kwargs.get("headers", {})
        return self._parse(self._send(lambda: self.http.request(method, path, **kwargs), idempotent=method == "GET",
                                      keyed=keyed))

    def _json_if_changed(self, path: str, etag: str | None) -> tuple[dict | None, str | None]:
        """GET `path` conditionally: (None, etag) when the server answers 304 Not Modified."""
        headers = {"If-None-Match": etag} if etag else {}
        response = self._send(lambda: self.http.get(path, headers=headers), idempotent=True)
        if response.status_code == 304:
            return None, etag
        return self._parse(response), response.headers.get("etag")

    def _send(self, send, idempotent: bool, keyed: bool = False) -> httpx.Response:
        """Retry transient failures with jittered exponential backoff. A request that may have
        reached the server is retried only if it is idempotent (GET), carries an Idempotency-Key
        (`keyed`: a POST whose answer the server keeps), or was refused before any work (429), so
        nothing is created twice. A keyed POST is not retried on the API's own 500/503: the server
        keeps no answer for those, so a retry would run it again (a 503 `broker_unavailable` job is
        already stored, as failed); a gateway's 502/504 may hide a kept answer, so those are."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = send()
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if last:
                    raise ServerUnreachable("server_unreachable", f"cannot reach {self.base_url}: {exc}") from exc
            except httpx.TransportError as exc:
                if last or not (idempotent or keyed):
                    raise ServerUnreachable("server_unreachable", f"connection to {self.base_url} failed: {exc}") from exc
            except httpx.HTTPError as exc:  # redirects, decoding: not transient
                raise ModelpressError("http_error", f"{type(exc).__name__}: {exc}") from exc
            else:
                if keyed and _key_in_use(response) and not last:
                    time.sleep(self.backoff * (2**attempt) * (0.5 + random.random()))
                    continue  # the first try of this request is still running: its answer comes next
                if response.status_code not in RETRY_STATUSES or last:
                    return response
                if not idempotent and response.status_code not in ({429, 502, 504} if keyed else {429}):
                    return response
                retry_after = response.headers.get("retry-after", "")
                if retry_after.isdigit():
                    time.sleep(min(float(retry_after), 30.0))
                    continue
            time.sleep(self.backoff * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    @staticmethod
    def _parse(response: httpx.Response) -> dict:
        content_type = response.headers.get("content-type", "")
        if response.content and "json" not in content_type and response.status_code not in (502, 503, 504):
            # A web server, a proxy's login page: not this API. Say so instead of dumping its HTML.
            # (502-504 without JSON is a proxy saying modelpress behind it is down: http_50x below.)
            raise ServerUnreachable("not_modelpress", f"{response.request.url} answered HTTP {response.status_code} with "
                                    f"{content_type.split(';')[0] or 'no content type'}, not the modelpress API: check --url")
        if response.is_success:
            return response.json() if response.content else {}
        try:
            problem = response.json()
        except ValueError:
            problem = {}
        if not isinstance(problem, dict):
            problem = {}
        code = problem.get("code") or f"http_{response.status_code}"
        message = problem.get("detail") or ("json" in content_type and response.text[:500]) or \
            f"HTTP {response.status_code} {response.reason_phrase}"
        raise ModelpressError(code, message, status=response.status_code, problem=problem)

    def _download(self, url: str, target: Path, sha256: str) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        for attempt in range(self.retries + 1):
            digest = hashlib.sha256()
            try:
                # follow_redirects: on S3 the API may answer 307 to a presigned URL (httpx drops
                # the Authorization header when a redirect leaves the API's origin).
                with self.http.stream("GET", url, follow_redirects=True) as response:
                    if response.status_code in RETRY_STATUSES:
                        raise _RetryableStatus(f"HTTP {response.status_code}")
                    if not response.is_success:
                        response.read()
                        self._parse(response)
                    with open(partial, "wb") as out:
                        for chunk in response.iter_bytes(1024 * 1024):
                            digest.update(chunk)
                            out.write(chunk)
            except (httpx.TransportError, _RetryableStatus) as exc:
                partial.unlink(missing_ok=True)
                if attempt == self.retries:
                    raise ServerUnreachable("download_failed", f"download of {url} kept failing: {exc}") from exc
                time.sleep(self.backoff * (2**attempt))
                continue
            if digest.hexdigest() != sha256:
                partial.unlink(missing_ok=True)
                if attempt == self.retries:
                    raise ModelpressError("checksum_mismatch", f"{url}: sha256 {digest.hexdigest()} != {sha256}")
                continue
            partial.replace(target)
            return target
        raise AssertionError("unreachable")


def _task_body(task: Mapping[str, Any] | str) -> dict[str, Any]:
    """A task as the API takes it: a type name ("detection") is the task of that type with its defaults."""
    return {"type": task} if isinstance(task, str) else dict(task)
