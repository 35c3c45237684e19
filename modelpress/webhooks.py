"""Webhook signatures, the Standard Webhooks scheme (https://www.standardwebhooks.com).

A delivery carries three headers: `webhook-id` (the message id, the same on every retry: dedupe on
it), `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, possibly several, space-separated, while a
secret is rotated). The secret is `whsec_<base64 of the key bytes>`.

A receiver calls `verify(body, headers, secret)` with the raw body bytes (before any JSON
parsing: a re-encoded body no longer matches) and gets the event back. The sender signs with
`sign`. Standard library only: this module is used by receivers that install nothing else.
"""

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"
# Standard Webhooks' recommended tolerance: a captured delivery cannot be replayed after this.
TOLERANCE_S = 5 * 60
SECRET_BYTES = 32


class WebhookVerificationError(Exception):
    """The delivery is not from the holder of the secret, or it is too old (or too new) to trust."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The key bytes of a `whsec_...` secret; ValueError if it is not one."""
    encoded = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret is whsec_ followed by base64") from exc


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def sign(secret: str, message_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The three headers of one delivery attempt."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{signature(secret, message_id, timestamp, body)}",
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    # Header names are case-insensitive; a plain dict from a framework may keep any case.
    for key, value in headers.items():
        if key.lower() == name:
            return value
    raise WebhookVerificationError(f"missing header {name}")


def verify(payload: bytes, headers: Mapping[str, str], secret: str, *, tolerance_s: int = TOLERANCE_S,
           now: float | None = None) -> dict:
    """The event of a delivery whose signature matches `secret` and whose timestamp is within
    `tolerance_s` of now; `WebhookVerificationError` otherwise."""
    message_id = _header(headers, "webhook-id")
    timestamp_text = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    try:
        timestamp = int(timestamp_text)
    except ValueError as exc:
        raise WebhookVerificationError("webhook-timestamp is not a number of seconds") from exc
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is {int(now - timestamp)} s from now (tolerance {tolerance_s} s)")
    try:
        expected = signature(secret, message_id, timestamp, payload)
    except ValueError as exc:
        raise WebhookVerificationError(str(exc)) from exc
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected.encode()):
            break
    else:
        raise WebhookVerificationError("no webhook-signature matches the secret")
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise WebhookVerificationError("the signed body is not JSON") from exc
