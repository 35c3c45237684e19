"""A job as the client sees it (`Job`): read, refreshed, waited for (its event stream, or polling
with backoff) with a progress bar (`ProgressBar`), cancelled, its artifacts downloaded. Made by
`modelpress.client.Client`, whose transport it uses."""

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from modelpress import sse
from modelpress.errors import JOB_FAILURES, JobCancelled, JobFailed, ModelpressError, WaitTimeout

if TYPE_CHECKING:
    from modelpress.client import Client

# A job's statuses (the server's service/jobs/states.py): `cancelling` is a running job asked to
# stop; its worker ends it `cancelled` at its next check.
STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
FINISHED = {"succeeded", "failed", "cancelled"}


class Job:
    """A job as last seen; `refresh()` reads it again.

    A job from `Client.jobs()` starts as the list's summary (status, stage, progress, headline);
    `metrics` and `artifacts` read the full job the first time they are asked for."""

    def __init__(self, client: "Client", body: dict, etag: str | None = None):
        self._client = client
        self.raw = body
        self._etag = etag

    id = property(lambda self: self.raw["id"])
    status = property(lambda self: self.raw["status"])
    stage = property(lambda self: self.raw["stage"])
    progress = property(lambda self: float(self.raw["progress"]))
    error = property(lambda self: self.raw.get("error"))
    headline = property(lambda self: self.raw.get("headline") or {})

    @property
    def is_summary(self) -> bool:
        return "metrics" not in self.raw

    @property
    def metrics(self) -> dict:
        return self._full().raw.get("metrics") or {}

    @property
    def artifacts(self) -> dict[str, dict]:
        return {a["name"]: a for a in self._full().raw.get("artifacts", [])}

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r}, stage={self.stage!r}, progress={self.progress:.2f})"

    def _full(self) -> "Job":
        return self.refresh() if self.is_summary else self

    def refresh(self) -> "Job":
        """Read the job again. Sends the last ETag, so an unchanged job costs the server a 304."""
        body, self._etag = self._client._json_if_changed(f"/v1/jobs/{self.id}", self._etag)
        if body is not None:
            self.raw = body
        return self

    def cancel(self) -> "Job":
        """Ask the job to stop: a queued job is `cancelled` at once, a running one `cancelling`
        until its worker stops it (`wait()` for the end)."""
        self.raw = self._client._json("POST", f"/v1/jobs/{self.id}/cancel")
        return self

    def wait(self, timeout: float | None = None, progress: bool = True, poll_interval: float = 0.5,
             max_interval: float = 5.0, on_update=None, stream: bool = True) -> "Job":
        """Wait until the job finishes: over its event stream (`GET /v1/jobs/{id}/events`), or by
        polling when the server has no stream, the stream breaks, or `stream=False`. Raises
        JobFailed (GuardNotMet for a failed guard, FidelityFloorNotMet for a missed safety floor),
        JobCancelled, or WaitTimeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        reporter = on_update or (ProgressBar(sys.stderr) if progress else None)
        if not (stream and self._follow_events(deadline, timeout, reporter)):
            self._poll(deadline, timeout, reporter, poll_interval, max_interval)
        if isinstance(reporter, ProgressBar):
            reporter.close()
        return self.raise_for_status()

    # The stream ended cleanly (its time limit) this many times in a row without news: poll instead.
    STREAM_RECONNECTS = 3

    def _follow_events(self, deadline: float | None, timeout: float | None, reporter) -> bool:
        """Follow the job's events until its `result`; True when it came. False: the server has
        no event stream or it broke (the caller polls). Reconnects with Last-Event-ID when the
        server ends a stream (each lasts a bounded time)."""
        last_id, quiet_ends = None, 0
        while quiet_ends < self.STREAM_RECONNECTS:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            got_any = False
            try:
                with self._client.http.stream("GET", f"/v1/jobs/{self.id}/events", headers=headers,
                                              timeout=self._client.stream_timeout(deadline)) as response:
                    if response.status_code != 200 or "text/event-stream" not in response.headers.get("content-type", ""):
                        return False  # an older server (404/405), or none right now (503): poll
                    for event in sse.events(response.iter_lines()):
                        if deadline is not None and time.monotonic() > deadline:
                            raise WaitTimeout("wait_timeout", f"job {self.id} still {self.status} after {timeout} s")
                        if event is None:
                            continue
                        got_any, last_id = True, event.id if event.id is not None else last_id
                        if self._apply(event, reporter):
                            return True
            except httpx.TimeoutException as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeout("wait_timeout", f"job {self.id} still {self.status} after {timeout} s") from exc
                return False
            except (httpx.TransportError, ValueError):  # the stream broke, or a malformed event
                return False
            quiet_ends = 0 if got_any else quiet_ends + 1
        return False

    def _apply(self, event: "sse.Event", reporter) -> bool:
        """Fold one event into the job; True for the final `result`."""
        data = json.loads(event.data)
        if event.event == "result":
            self.refresh()  # the full job (metrics, artifacts); the result event is its summary
            if reporter is not None:
                reporter(self)
            return True
        if event.event in ("status", "progress"):
            self.raw = {**self.raw, **{k: data[k] for k in ("status", "stage", "progress", "error") if k in data}}
            if reporter is not None:
                reporter(self)
        elif event.event == "log" and isinstance(reporter, ProgressBar):
            reporter.log(data.get("line", ""))
        return False

    def _poll(self, deadline: float | None, timeout: float | None, reporter, poll_interval: float,
              max_interval: float) -> None:
        interval, last = poll_interval, None
        while True:
            self.refresh()
            seen = (self.status, self.stage, round(self.progress, 3))
            if reporter is not None:
                reporter(self)
            if self.status in FINISHED:
                break
            # Back off while nothing moves; poll briskly again once it does.
            interval = poll_interval if seen != last else min(max_interval, interval * 1.5)
            last = seen
            if deadline is not None and time.monotonic() + interval > deadline:
                raise WaitTimeout("wait_timeout", f"job {self.id} still {self.status} after {timeout} s")
            time.sleep(interval)

    def raise_for_status(self) -> "Job":
        if self.status == "failed":
            code = (self.error or {}).get("code", "job_failed")
            message = (self.error or {}).get("message", "")
            raise JOB_FAILURES.get(code, JobFailed)(self, code, message)
        if self.status == "cancelled":
            raise JobCancelled(self)
        return self

    def download(self, name: str = "model.onnx", to: str | os.PathLike | None = None) -> Path:
        """Stream an artifact to `to` (a file, or a folder to put `name` in), verify its sha256,
        and retry an interrupted transfer a bounded number of times."""
        artifact = self.artifacts.get(name) or self.refresh().artifacts.get(name)
        if artifact is None:
            raise ModelpressError("artifact_not_found", f"job {self.id} has no artifact {name!r} (has: {sorted(self.artifacts)})")
        target = Path(to) if to is not None else Path(name)
        # A folder that exists, or a path written as one ("out/"), which is then created.
        if target.is_dir() or str(to).endswith(("/", os.sep)):
            target = target / name
        return self._client._download(artifact["url"], target, artifact["sha256"])


class ProgressBar:
    """Stage and percent on one redrawn line on a terminal; one plain line per change otherwise."""

    def __init__(self, stream, width: int = 30):
        self.stream, self.width = stream, width
        # A bar only when a person watches; pipes and CI logs get one plain line per change.
        self.tty = stream.isatty() and sys.stdout.isatty()
        self.last: tuple | None = None

    def __call__(self, job: Job) -> None:
        percent = int(job.progress * 100)
        state = (job.status, job.stage, percent)
        if state == self.last:
            return
        self.last = state
        if self.tty:
            filled = int(self.width * job.progress)
            line = f"[{'#' * filled}{'.' * (self.width - filled)}] {percent:3d}% {job.status}: {job.stage}"
            # Padded to the terminal's width (and cut to it): no leftovers of a longer earlier stage.
            columns = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
            self.stream.write(f"\r{line[:columns]:<{columns}}")
        else:
            self.stream.write(f"{job.id} {job.status} {percent}% {job.stage}\n")
        self.stream.flush()

    def log(self, line: str) -> None:
        """A line of the job's log, above the bar on a terminal; plain otherwise."""
        self.stream.write(f"\r{line}\n" if self.tty else f"  {line}\n")
        if self.tty:
            self.last = None  # redraw the bar below the line
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
