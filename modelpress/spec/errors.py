"""Domain errors: one hierarchy for the API's services and the engine, each with a stable `code`
listed in docs/ERRORS.md. HTTP statuses are data here; the one mapping to problem+json is
`service.errors.install_error_handlers`."""

from typing import Any


class DomainError(Exception):
    status = 400
    code = "bad_request"
    title = "Bad request"
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if headers:
            self.headers = {**self.headers, **headers}
        self.extra = extra


class NotFound(DomainError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(DomainError):
    status, code, title = 409, "conflict", "Conflict"


class Invalid(DomainError):
    status, code, title = 422, "invalid_request", "Unprocessable content"


class QuotaExceeded(DomainError):
    status, code, title = 403, "quota_exceeded", "Quota exceeded"


class TooLarge(DomainError):
    status, code, title = 413, "upload_too_large", "Content too large"


class UnsupportedMediaType(DomainError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class EngineError(Invalid):
    """A failure the user can act on, raised by the engine (at a job's run) or by the checks the API
    runs before accepting a job (then it answers 422 with this code)."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code=code)
