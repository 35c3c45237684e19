"""GET /v1/jobs/{id}/events: the job's status, progress, log lines and final result as
Server-Sent Events (text/event-stream), resumable with Last-Event-ID."""

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from service.auth import ReadCaller
from service.deps import ContextDep, SessionDep
from service.errors import DomainError
from service.job_events.stream import StreamSlots, job_stream
from service.jobs import service as jobs
from service.jobs.tables import JobRow
from service.jobs.views import to_summary

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

EVENT_STREAM = "text/event-stream"


class StreamsExhausted(DomainError):
    status, code, title = 503, "too_many_event_streams", "Service unavailable"
    headers = {"Retry-After": "5"}


class CountedStream(StreamingResponse):
    """Gives its slot back however the stream ends: the result sent, the client gone, an error."""

    def __init__(self, *args, on_close, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class BadLastEventId(DomainError):
    status, code, title = 400, "invalid_last_event_id", "Bad request"


def _slots(request: Request, limit: int) -> StreamSlots:
    # One count per app (per process); made on first use so the app factory needs no line for it.
    state = request.app.state
    if not hasattr(state, "event_stream_slots"):
        state.event_stream_slots = StreamSlots(limit)
    return state.event_stream_slots


def _summary(job: JobRow) -> dict:
    return to_summary(job).model_dump(mode="json")


def parse_last_event_id(value: str | None) -> int:
    if value is None or value.strip() == "":
        return 0
    if not value.strip().isdigit() or len(value.strip()) > 18:
        raise BadLastEventId("Last-Event-ID must be the id of an event of this stream (a non-negative integer)")
    return int(value.strip())


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"description": "Server-Sent Events: `status`, `progress`, `log`, then one `result`",
                             "content": {EVENT_STREAM: {}}}})
def job_events(job_id: str, request: Request, context: ContextDep, session: SessionDep, caller: ReadCaller,
               last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None):
    """The job's events from the start, or after `Last-Event-ID`: `status` (status, stage,
    progress, error), `progress` (stage, progress), `log` (line), each with its `id`; then, once
    the job has finished, `result` (the job summary) and the stream ends. Comments (`: keep-alive`)
    keep an idle connection open. A stream lasts at most `MODELPRESS_SSE_MAX_STREAM_S`; reconnect
    with Last-Event-ID to continue."""
    after = parse_last_event_id(last_event_id)
    jobs.get(session=session, tenant_id=caller.tenant_id, job_id=job_id)  # another tenant's job: 404
    # The stream reads with sessions of its own: this one would hold a pooled connection for as
    # long as the stream lives (a yield dependency closes it only after the response).
    session.close()
    slots = _slots(request, context.settings.sse_max_streams)
    if not slots.take():
        raise StreamsExhausted(f"this server holds {slots.limit} event streams open; poll GET /v1/jobs/{job_id} "
                               "or retry shortly")
    body = job_stream(session_factory=context.session_factory, settings=context.settings, job_id=job_id, after=after,
                      summary_of=_summary)
    # no-cache and X-Accel-Buffering: no proxy (nginx) holds the events back to buffer them.
    return CountedStream(body, media_type=EVENT_STREAM, on_close=slots.give_back,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
