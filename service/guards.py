"""Request guards that sit in front of every route, as plain ASGI middleware.

They stop input that no route should ever see, before it reaches a route, a database driver or a
log line: control characters in the path or query (PostgreSQL refuses NUL in text, and a NUL in an
id used to surface as a 500), and JSON bodies larger than any valid request. Uploads are multipart
and bounded by their own limits in `service.uploads`.
"""

from urllib.parse import unquote_to_bytes

from service.errors import problem


def has_control_characters(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


class RequestGuard:
    def __init__(self, app, *, max_json_body_bytes: int):
        self.app = app
        self.max_json_body_bytes = max_json_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        query = unquote_to_bytes(scope.get("query_string", b"")).decode("utf-8", "replace")
        if has_control_characters(scope["path"]) or has_control_characters(query):
            response = problem(400, "invalid_characters", "Bad request",
                               "the path or query holds control characters (NUL, newline, ...); ids and cursors never do",
                               scope["path"].encode("unicode_escape").decode()[:200])
            return await response(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        if content_type.startswith("multipart/"):
            return await self.app(scope, receive, send)
        limit = self.max_json_body_bytes
        declared = headers.get(b"content-length", b"")
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
