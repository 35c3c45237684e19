"""The request id (and, in the worker, the job id) of what this thread or task is doing now.

Set by the HTTP middleware for a request and by the runner for a job; read by the log filter, so
every log line of a request, and every line the worker writes for a job, carries them.
"""

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("modelpress_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("modelpress_job_id", default=None)
# The ASGI scope key holding the request's id: the 500 handler reads it (Starlette's
# ServerErrorMiddleware answers outside every middleware of ours).
SCOPE_KEY = "modelpress.request_id"

# What a proxy or a client may send: ids of the usual forms (uuid, hex, ULID, "req-1:abc"), nothing that
# could break a log line or a header.
_ALLOWED = re.compile(r"^[A-Za-z0-9._:-]+$")


def new_request_id() -> str:
    return uuid.uuid4().hex


def accepted_request_id(value: str | None, max_chars: int) -> str | None:
    """`value` when it is a well-formed id of at most `max_chars`, else None (make a new one)."""
    if value and len(value) <= max_chars and _ALLOWED.match(value):
        return value
    return None


@contextmanager
def bound(*, request_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Within the block, log lines of this thread carry these ids."""
    tokens = [(request_id_var, request_id_var.set(request_id))] if request_id is not None else []
    if job_id is not None:
        tokens.append((job_id_var, job_id_var.set(job_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
