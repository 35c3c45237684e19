"""Request guards that sit in front of every route, as plain ASGI middleware.

They stop input that no route should ever see, before it reaches a route, a database driver or a
log line:
- control characters in the path or query (PostgreSQL refuses NUL in text, and a NUL in an id used
  to surface as a 500);
- JSON bodies larger than any valid request (uploads are multipart and bounded by their own limits
  in `service.uploads`; upload-session parts by the part size in `service.upload_sessions.receive`);
- a body that stops arriving: each chunk must come within `body_idle_timeout_s` (a slow-body client
  otherwise holds a connection forever; slow *headers* are the reverse proxy's job, see README);
- a Host the instance does not serve (DNS rebinding of a 127.0.0.1 instance), and writes from a
  page of another origin (a browser tab must not post into a local instance).
"""

import asyncio
import re
from urllib.parse import unquote_to_bytes, urlsplit

from service.errors import problem

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# An upload session's part: raw bytes, bounded by the part size in service.upload_sessions.receive.
UPLOAD_PART_PATH = re.compile(r"^/v1/uploads/[^/]+/parts/[^/]+$")


def has_control_characters(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def host_name(netloc: str) -> str:
    return (urlsplit(f"//{netloc}").hostname or "").lower()


class RequestGuard:
    def __init__(self, app, *, max_json_body_bytes: int, body_idle_timeout_s: float, allowed_hosts: list[str]):
        self.app = app
        self.max_json_body_bytes = max_json_body_bytes
        self.body_idle_timeout_s = body_idle_timeout_s
        self.allowed_hosts = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)

        async def timed_receive():
            try:
                return await asyncio.wait_for(receive(), self.body_idle_timeout_s)
            except TimeoutError:
                return {"type": "http.disconnect"}  # the route sees a client that went away

        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").decode("latin-1").lower().startswith("multipart/") or (
                scope["method"] == "PUT" and UPLOAD_PART_PATH.match(scope["path"])):
            return await self.app(scope, timed_receive, send)
        return await self._bounded(scope, timed_receive, send)

    def _refusal(self, scope):
        headers = dict(scope.get("headers") or [])
        path = scope["path"]
        query = unquote_to_bytes(scope.get("query_string", b"")).decode("utf-8", "replace")
        if has_control_characters(path) or has_control_characters(query):
            return problem(400, "invalid_characters", "Bad request",
                           "the path or query holds control characters (NUL, newline, ...); ids and cursors never do",
                           path.encode("unicode_escape").decode()[:200])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed_hosts and host_name(host) not in self.allowed_hosts:
            return problem(421, "host_not_allowed", "Misdirected request",
                           "this instance does not serve that Host (set MODELPRESS_ALLOWED_HOSTS to add one)", path)
        origin = headers.get(b"origin", b"").decode("latin-1")
        if scope["method"] in UNSAFE_METHODS and origin and origin != "null" and urlsplit(origin).netloc.lower() != host.lower():
            return problem(403, "cross_origin_refused", "Forbidden",
                           "a write from a page of another origin is refused; call the API from a client, not a web page", path)
        if origin == "null" and scope["method"] in UNSAFE_METHODS:
            return problem(403, "cross_origin_refused", "Forbidden", "a write from an opaque origin is refused", path)
        return None

    async def _bounded(self, scope, receive, send):
        limit = self.max_json_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = problem(413, "body_too_large", "Content too large",
                               f"the request body is {int(declared)} bytes; at most {limit} are accepted", scope["path"])
            return await response(scope, receive, send)
        # Small bodies are read here in full (bounded by the limit), so an oversized one sent without
        # a Content-Length (chunked) is refused before any route parses it.
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > limit:
                response = problem(413, "body_too_large", "Content too large",
                                   f"the request body is over {limit} bytes", scope["path"])
                return await response(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)
