"""Domain errors and their one mapping to RFC 9457 problem+json.

Services raise these with a stable `code`; only `install_error_handlers` knows about HTTP.
Every code is listed in docs/ERRORS.md.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.ops.context import SCOPE_KEY

from modelpress.spec.errors import (  # noqa: F401  (re-exported: the services raise them from here)
    Conflict, DomainError, EngineError, Invalid, NotFound, QuotaExceeded, TooLarge, UnsupportedMediaType)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 5


def problem(status: int, code: str, title: str, detail: str, instance: str, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    body = {
        "type": f"urn:modelpress:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": instance,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_STATUS_CODES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("upload_too_large", "Content too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API serves at this path, read from its OpenAPI paths (Starlette's own 405
    names only the first route that matched the path)."""
    import re

    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, request.url.path):
            methods |= {m.upper() for m in operations if m in ("get", "head", "put", "post", "delete", "patch")}
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError):
        return problem(exc.status, exc.code, exc.title, exc.message, request.url.path, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"
        return problem(422, "validation_error", "Unprocessable content", detail, request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code, title = _STATUS_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        response = problem(exc.status_code, code, title, str(exc.detail), request.url.path)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_down(request: Request, exc: Exception):
        # Connection refused, timed out or dropped: the database is away, not the request wrong.
        log.warning("database unavailable on %s: %s", request.url.path, exc.__class__.__name__)
        response = problem(503, "service_unavailable", "Service unavailable",
                           "the database is not reachable; try again shortly", request.url.path)
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.exception_handler(DataError)
    async def _data_refused(request: Request, exc: DataError):
        # The database refused a value the validation let through (a number out of its range, NUL
        # in text): the request's fault, and nothing was written.
        log.warning("database refused a value on %s: %s", request.url.path, str(exc.orig)[:200])
        return problem(422, "invalid_value", "Unprocessable content",
                       "a value in the request is outside what can be stored (out of range, or a control character)",
                       request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        response = problem(500, "internal_error", "Internal error", "unexpected server error", request.url.path)
        # The connection may be in any state after an unexpected error: tell the client not to reuse it.
        response.headers["Connection"] = "close"
        response.headers["X-Request-ID"] = request.scope.get(SCOPE_KEY, "")
        return response
