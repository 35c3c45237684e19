"""`Idempotency-Key` on POST and PATCH requests, as ASGI middleware in front of every route.

The first request with a key runs; its answer (status, headers, body) is stored before it is sent,
under the key, for the tenant, with a fingerprint: sha-256 of method, path, query, tenant and the
body bytes. A repeat with the same key and fingerprint gets that answer again, with
`Idempotent-Replayed: true`, and nothing runs; with another fingerprint, 409
`idempotency_key_reused`. A repeat that arrives while the first still runs waits for its answer up
to `idempotency_wait_s`, then gets 409 `idempotency_key_in_use`.

Answers that say nothing final about the request are not kept and the key is given back, so a
retry runs anew: 5xx (the broker was down), 401/403/429 (about the key or the rate, not the
request), an answer over `idempotency_max_response_bytes`, and any request whose body was not read
to its end (the fingerprint would not cover it: an upload cut off at its size limit).
"""

import hashlib
import time
import uuid

import anyio
from starlette.datastructures import Headers

from service.auth import tenant_of
from service.errors import Conflict, DomainError, Invalid, problem
from service.idempotency import service as idempotency
from service.idempotency.tables import MAX_KEY_CHARS

HEADER = "idempotency-key"
# The methods whose repeat could do something twice (a PATCH that changes a model's task, then a
# retry arriving after another client's change, would undo it).
KEYED_METHODS = {"POST", "PATCH"}
REPLAYED = (b"idempotent-replayed", b"true")
NOT_KEPT = {401, 403, 408, 429}
WAIT_STEP_S = 0.1
# Headers of the first answer that describe that moment, not the answer.
NOT_REPLAYED_HEADERS = {"date", "server"}
MULTIPART_OVERHEAD = 1024 * 1024


class KeyInvalid(Invalid):
    status, code, title = 400, "idempotency_key_invalid", "Bad request"


class KeyReused(Conflict):
    code = "idempotency_key_reused"


class KeyInUse(Conflict):
    code = "idempotency_key_in_use"
    headers = {"Retry-After": "1"}


def _valid_key(key: str) -> bool:
    # Visible ASCII: what a UUID, a ULID or a CI run id is; never a control character in a log line.
    return 0 < len(key) <= MAX_KEY_CHARS and all(0x21 <= ord(c) <= 0x7E for c in key)


async def _refuse(exc: DomainError, scope, receive, send) -> None:
    response = problem(exc.status, exc.code, exc.title, exc.message, scope["path"], headers=exc.headers, **exc.extra)
    await response(scope, receive, send)


class IdempotencyMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in KEYED_METHODS:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        key = headers.get(HEADER)
        if key is None:
            return await self.app(scope, receive, send)
        if not _valid_key(key):
            return await _refuse(KeyInvalid(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} visible ASCII characters "
                                            "(a UUID fits)"), scope, receive, send)
        context = scope["app"].state.context
        settings = context.settings

        def lookup_tenant():
            with context.session_factory() as session:
                return tenant_of(authorization=headers.get("authorization", ""), session=session, settings=settings)

        tenant_id = await anyio.to_thread.run_sync(lookup_tenant)
        if tenant_id is None:  # no valid key: the route refuses the request (401) and nothing is stored
            return await self.app(scope, receive, send)
        fingerprint = hashlib.sha256()
        for part in (scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"), tenant_id):
            fingerprint.update(part.encode() + b"\0")

        owner = uuid.uuid4().hex

        def take():
            with context.session_factory() as session:
                return idempotency.take(session=session, tenant_id=tenant_id, key=key, owner=owner,
                                        method=scope["method"], path=scope["path"], ttl_s=settings.idempotency_ttl_s,
                                        running_timeout_s=settings.idempotency_in_progress_timeout_s,
                                        max_keys=settings.idempotency_max_keys_per_tenant)

        deadline = time.monotonic() + settings.idempotency_wait_s
        while True:
            try:
                outcome = await anyio.to_thread.run_sync(take)
            except DomainError as exc:
                return await _refuse(exc, scope, receive, send)
            if outcome is not None:
                break
            if time.monotonic() >= deadline:
                return await _refuse(KeyInUse("a request with this Idempotency-Key is still running; retry shortly "
                                              "for its answer"), scope, receive, send)
            await anyio.sleep(WAIT_STEP_S)

        if isinstance(outcome, idempotency.Answer):
            limit = max(settings.max_model_bytes, settings.max_dataset_bytes) + MULTIPART_OVERHEAD
            if not await _hash_body(receive, fingerprint, limit) or fingerprint.hexdigest() != outcome.fingerprint:
                return await _refuse(KeyReused("this Idempotency-Key was used for another request (method, path or "
                                               "body differ); use a fresh key for a new request"), scope, receive, send)
            return await _replay(outcome, send)
        await self._first(scope, receive, send, context=context, tenant_id=tenant_id, key=key, owner=owner,
                          fingerprint=fingerprint)

    async def _first(self, scope, receive, send, *, context, tenant_id: str, key: str, owner: str, fingerprint) -> None:
        """Run the request that took the key; keep its answer before sending its last byte."""
        max_bytes = context.settings.idempotency_max_response_bytes
        seen = {"body_read": False, "start": None, "size": 0, "settled": False}
        chunks: list[bytes] = []

        async def hashing_receive():
            message = await receive()
            if message["type"] == "http.request":
                fingerprint.update(message.get("body", b""))
                if not message.get("more_body", False):
                    seen["body_read"] = True
            return message

        def settle(keep: bool) -> None:
            seen["settled"] = True
            with context.session_factory() as session:
                if not keep:
                    idempotency.give_back(session=session, tenant_id=tenant_id, key=key, owner=owner)
                    return
                start = seen["start"]
                headers = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in start.get("headers", [])
                           if n.decode("latin-1").lower() not in NOT_REPLAYED_HEADERS]
                answer = idempotency.Answer("", start["status"], headers, b"".join(chunks))
                idempotency.keep(session=session, tenant_id=tenant_id, key=key, owner=owner,
                                 fingerprint=fingerprint.hexdigest(), answer=answer)

        async def capturing_send(message):
            if message["type"] == "http.response.start":
                seen["start"] = message
            elif message["type"] == "http.response.body" and not seen["settled"]:
                body = message.get("body", b"")
                seen["size"] += len(body)
                if seen["size"] <= max_bytes:
                    chunks.append(body)
                if not message.get("more_body", False):
                    status = seen["start"]["status"]
                    keep = (seen["body_read"] and seen["size"] <= max_bytes and status < 500 and status not in NOT_KEPT)
                    await anyio.to_thread.run_sync(settle, keep)
            await send(message)

        try:
            await self.app(scope, hashing_receive, capturing_send)
        finally:
            if not seen["settled"]:
                # An error, a client gone, an answer never finished: a retry must run anew.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(settle, False)


async def _hash_body(receive, fingerprint, limit: int) -> bool:
    """Read the whole request body into `fingerprint`. False when it is cut off or over `limit`."""
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            return False
        fingerprint.update(body)
        if not message.get("more_body", False):
            return True


async def _replay(answer: idempotency.Answer, send) -> None:
    headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in answer.headers] + [REPLAYED]
    await send({"type": "http.response.start", "status": answer.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})
