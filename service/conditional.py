"""Conditional reads: a JSON body encoded once, its ETag drawn from those bytes, and a 304 for a
client that already holds them (RFC 9110 §13.1.2). Polling clients send `If-None-Match` and get
an empty 304 until something in the job changes."""

import hashlib

from fastapi import Request, Response
from pydantic import BaseModel


def etag_of(body: bytes) -> str:
    # blake2b of a few KB costs microseconds; a strong validator since it covers the exact bytes.
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def _matches(if_none_match: str, etag: str) -> bool:
    if if_none_match.strip() == "*":
        return True
    # Weak comparison (§8.8.3.2): W/"x" matches "x", as proxies may weaken a tag.
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def encoded(model: BaseModel, *, status_code: int = 200, headers: dict | None = None) -> Response:
    """`model` as JSON, encoded here, in the route's thread. Returning a model instead would have
    FastAPI serialise it on another thread-pool thread while the route's session still holds its
    database connection: under load every thread can be a route waiting for a connection that
    only such a serialisation would free (a deadlock seen at 200 connections)."""
    return Response(content=model.__pydantic_serializer__.to_json(model), status_code=status_code,
                    media_type="application/json", headers=headers)


def json_or_not_modified(request: Request, model: BaseModel) -> Response:
    """`model` as JSON with an ETag, or 304 Not Modified when the request's If-None-Match names it."""
    body = model.__pydantic_serializer__.to_json(model)
    etag = etag_of(body)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and _matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(content=body, media_type="application/json", headers=headers)
