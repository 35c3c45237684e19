"""The outermost middleware: a request id for every request, and its count and latency.

Pure ASGI (no BaseHTTPMiddleware task hop). The id comes from `X-Request-ID` when well formed, else
a new one; it is returned on every response and bound for the request's log lines. Metrics are
labelled by the route *template* (`/v1/jobs/{job_id}`), never the raw path, so a scan of random
URLs cannot make the series unbounded.
"""

import time

from prometheus_client import Counter, Histogram

from service.ops.context import SCOPE_KEY, accepted_request_id, new_request_id, request_id_var

REQUEST_ID_HEADER = b"x-request-id"
UNMATCHED = "<unmatched>"

REQUESTS = Counter("modelpress_http_requests", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram("modelpress_http_request_duration_seconds", "HTTP request latency, to the end of the body",
                    ["method", "route", "status"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
# HTTP methods outside these are counted as "other": the method is a label too.
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def route_template(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED


class ObservedRequests:
    def __init__(self, app, *, request_id_max_chars: int):
        self.app, self.max_chars = app, request_id_max_chars

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER, b"").decode("latin-1")
        request_id = accepted_request_id(given, self.max_chars) or new_request_id()
        scope[SCOPE_KEY] = request_id
        # Not reset afterwards: the 500 handler logs outside this call, in the same task.
        request_id_var.set(request_id)
        started, status = time.perf_counter(), 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            labels = (method, route_template(scope), str(status))
            REQUESTS.labels(*labels).inc()
            LATENCY.labels(*labels).observe(time.perf_counter() - started)
