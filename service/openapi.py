"""What the OpenAPI spec declares beyond the routes' own schemas: the problem+json answers every
route may give, and the multipart bodies of uploads (read by streaming, so FastAPI cannot see them)."""

from typing import Any

from pydantic import BaseModel, ConfigDict

from service.errors import PROBLEM_JSON


class Problem(BaseModel):
    """RFC 9457 problem details; `code` is stable (docs/ERRORS.md). Some carry extra members."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "model": Problem, "content": {PROBLEM_JSON: {}}}


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _problem("Bad request (e.g. control characters in the path: `invalid_characters`)"),
    403: _problem("Forbidden (e.g. `cross_origin_refused`)"),
    404: _problem("Not found (`model_not_found`, `dataset_not_found`, `job_not_found`, ...)"),
    405: _problem("Method not allowed; `Allow` lists the methods"),
    409: _problem("Conflict with the resource's state (`job_finished`, `model_in_use`, ...)"),
    413: _problem("Body or upload too large (`body_too_large`, `upload_too_large`)"),
    415: _problem("Unsupported media type"),
    421: _problem("Host not served by this instance (`host_not_allowed`)"),
    422: _problem("Unprocessable content (`validation_error` and the codes of docs/ERRORS.md)"),
    500: _problem("Internal error (a bug)"),
    503: _problem("A dependency is unavailable (`service_unavailable`, `broker_unavailable`); `Retry-After`"),
}


def upload_body(description: str, **text_fields: str) -> dict[str, Any]:
    properties = {"file": {"type": "string", "format": "binary", "description": description}}
    properties.update({name: {"type": "string", "description": text} for name, text in text_fields.items()})
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": properties}}}}}
