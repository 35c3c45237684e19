"""Which URLs a webhook may post to. Checked when an endpoint is registered (the URL's form, and
an address written in it) and again by the sender before each attempt (what the name resolves to
then), so a tenant cannot aim the worker at the cloud metadata service or the internal network."""

import ipaddress
import socket
from urllib.parse import urlsplit

from modelpress.spec.errors import Invalid


def _is_private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def check_form(url: str, *, max_length: int, private_allowed: bool) -> str:
    if len(url) > max_length:
        raise Invalid(f"a webhook URL is at most {max_length} characters", code="invalid_webhook_url", limit=max_length)
    if any(not c.isprintable() or c.isspace() for c in url):
        raise Invalid("a webhook URL holds no spaces or control characters", code="invalid_webhook_url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        raise Invalid(f"the webhook URL cannot be parsed: {exc}", code="invalid_webhook_url") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("a webhook URL is http:// or https:// with a host", code="invalid_webhook_url")
    if parts.username is not None or parts.password is not None:
        # It would be stored and shown in every listing: credentials belong in the signature.
        raise Invalid("a webhook URL carries no user name or password", code="invalid_webhook_url")
    if not private_allowed:
        host = parts.hostname
        literal = True
        try:
            private = _is_private(host)
        except ValueError:
            literal, private = False, host == "localhost" or host.endswith(".localhost")
        if private:
            raise Invalid(f"webhooks may not post to {'the address' if literal else 'the host'} {host}: it is not public",
                          code="webhook_url_refused")
    return url


def resolves_privately(url: str) -> str | None:
    """The first non-public address the URL's host resolves to now, or None."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for *_, sockaddr in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM):
        if _is_private(sockaddr[0]):
            return sockaddr[0]
    return None
