"""The Server-Sent Events stream of one job, read from the database.

A stream reads the job's new events every `sse_poll_interval_s` (one short session per read, on
the thread pool: it holds no connection between reads), sends each as an SSE event whose `id` is
its `seq`, sends a keep-alive comment when nothing was sent for `sse_keepalive_s`, and ends after
the `result` event of a finished job, or after `sse_max_stream_s` (the client reconnects with
Last-Event-ID). Polling needs no new infrastructure and works across API processes and Celery
workers alike: whatever writes the job writes its events in the same transaction.
"""

import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.job_events import service as job_events
from service.jobs.states import FINISHED
from service.jobs.tables import JobRow

BATCH = 200
RECONNECT_MS = 2000


def frame(*, event: str, data: dict | str, event_id: int | None = None) -> str:
    """One SSE event. JSON carries no raw newline, so `data` is always one line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), default=str)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {text}\n\n"


@dataclass
class Read:
    events: list[tuple[int, str, dict]]
    # The job's summary when it has finished and every event up to its end is in `events`.
    result: dict | None
    gone: bool = False


class StreamSlots:
    """How many streams this process holds open; past `limit` a new one is refused (503)."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give_back(self) -> None:
        with self.lock:
            self.open -= 1


def read_after(session_factory: sessionmaker[Session], *, job_id: str, seq: int,
               summary_of: Callable[[JobRow], dict]) -> Read:
    with session_factory() as session:
        # The status first, then the events: a job seen finished here has all its events committed
        # (they are written with the status), so the result never overtakes the last of them.
        status = session.scalar(select(JobRow.status).where(JobRow.id == job_id))
        if status is None:
            return Read([], None, gone=True)
        rows = job_events.after(session=session, job_id=job_id, seq=seq, limit=BATCH)
        events = [(row.seq, row.kind, row.data) for row in rows]
        result = None
        if status in FINISHED and len(rows) < BATCH:
            result = summary_of(session.get(JobRow, job_id))
        return Read(events, result)


async def job_stream(*, session_factory: sessionmaker[Session], settings: Settings, job_id: str, after: int,
                     summary_of: Callable[[JobRow], dict]) -> AsyncIterator[str]:
    yield f"retry: {RECONNECT_MS}\n\n"
    started = last_sent = time.monotonic()
    seq = after
    while True:
        read = await anyio.to_thread.run_sync(
            lambda: read_after(session_factory, job_id=job_id, seq=seq, summary_of=summary_of))
        if read.gone:
            return
        for seq, kind, data in read.events:
            yield frame(event=kind, data=data, event_id=seq)
            last_sent = time.monotonic()
        if read.result is not None:
            # The result carries the number of the job's last event: a client reconnecting after
            # it gets the result again, and nothing else.
            yield frame(event="result", data=read.result, event_id=seq)
            return
        now = time.monotonic()
        if now - started >= settings.sse_max_stream_s:
            return
        if now - last_sent >= settings.sse_keepalive_s:
            yield ": keep-alive\n\n"
            last_sent = now
        if len(read.events) < BATCH:
            await anyio.sleep(settings.sse_poll_interval_s)
