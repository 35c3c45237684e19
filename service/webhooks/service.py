"""Webhook endpoints and their deliveries, for the API. Every function takes the caller's tenant:
another tenant's endpoint or delivery reads as missing, the same 404 as an unknown id."""

import base64
import binascii

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import Conflict, Invalid, NotFound, QuotaExceeded
from service.ids import new_id
from service.pagination import newest_first
from service.tenants.tables import TenantRow
from service.webhooks import urls
from service.webhooks.schemas import WebhookCreate
from service.webhooks.tables import WebhookDeliveryRow, WebhookEndpointRow
from modelpress.webhooks import SECRET_PREFIX, new_secret

# Standard Webhooks: a key of 24 to 64 bytes.
SECRET_KEY_BYTES = (24, 64)


def _checked_secret(secret: str) -> str:
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True) if secret.startswith(SECRET_PREFIX) else b""
    except (binascii.Error, ValueError):
        key = b""
    low, high = SECRET_KEY_BYTES
    if not low <= len(key) <= high:
        raise Invalid(f"a webhook secret is {SECRET_PREFIX} followed by the base64 of {low} to {high} random bytes",
                      code="invalid_webhook_secret")
    return secret


def create(*, session: Session, tenant_id: str, body: WebhookCreate, max_endpoints: int, max_url_length: int,
           private_urls_allowed: bool) -> WebhookEndpointRow:
    url = urls.check_form(body.url, max_length=max_url_length, private_allowed=private_urls_allowed)
    secret = _checked_secret(body.secret) if body.secret is not None else new_secret()
    # The tenant's row lock (as the quota checks take it): two concurrent registrations are
    # counted one after the other, so the limit holds.
    session.execute(update(TenantRow).where(TenantRow.id == tenant_id).values(quota_checked_at=utcnow()))
    count = session.scalar(select(func.count()).select_from(WebhookEndpointRow).where(WebhookEndpointRow.tenant_id == tenant_id))
    if count >= max_endpoints:
        raise QuotaExceeded(f"a tenant has at most {max_endpoints} webhook endpoints", code="webhook_limit_reached",
                            limit=max_endpoints)
    row = WebhookEndpointRow(id=new_id("whk"), tenant_id=tenant_id, url=url, secret=secret,
                             event_types=sorted(set(body.event_types)), description="".join(c for c in body.description if c.isprintable()))
    session.add(row)
    session.flush()
    return row


def list_all(*, session: Session, tenant_id: str) -> list[WebhookEndpointRow]:
    # No cursor: a tenant has at most `webhook_max_endpoints`.
    return list(session.scalars(select(WebhookEndpointRow).where(WebhookEndpointRow.tenant_id == tenant_id)
                                .order_by(WebhookEndpointRow.created_at, WebhookEndpointRow.id)))


def get(*, session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpointRow:
    row = session.get(WebhookEndpointRow, endpoint_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"webhook {endpoint_id} does not exist", code="webhook_not_found", webhook_id=endpoint_id)
    return row


def delete(*, session: Session, tenant_id: str, endpoint_id: str) -> None:
    """Its deliveries go with it, pending ones too: nothing is sent to a URL the tenant removed."""
    row = get(session=session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    session.query(WebhookDeliveryRow).filter(WebhookDeliveryRow.endpoint_id == row.id).delete(synchronize_session=False)
    session.delete(row)
    session.flush()


def list_deliveries(*, session: Session, tenant_id: str, endpoint_id: str, limit: int, cursor: str | None):
    get(session=session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    return newest_first(session=session, table=WebhookDeliveryRow, tenant_id=tenant_id, limit=limit, cursor=cursor,
                        where=(WebhookDeliveryRow.endpoint_id == endpoint_id,))


def get_delivery(*, session: Session, tenant_id: str, endpoint_id: str, delivery_id: str) -> WebhookDeliveryRow:
    get(session=session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    row = session.get(WebhookDeliveryRow, delivery_id)
    if row is None or row.endpoint_id != endpoint_id:
        raise NotFound(f"delivery {delivery_id} does not exist", code="delivery_not_found", delivery_id=delivery_id)
    return row


def resend(*, session: Session, tenant_id: str, endpoint_id: str, delivery_id: str) -> WebhookDeliveryRow:
    """Due now, with the whole retry schedule ahead again; the same message id, so a receiver that
    already has it can tell."""
    row = get_delivery(session=session, tenant_id=tenant_id, endpoint_id=endpoint_id, delivery_id=delivery_id)
    moved = session.execute(
        update(WebhookDeliveryRow)
        .where(WebhookDeliveryRow.id == row.id, WebhookDeliveryRow.status != "sending")
        .values(status="pending", failures_in_a_row=0, next_attempt_at=utcnow())
    ).rowcount
    session.flush()
    session.refresh(row)
    if not moved:
        raise Conflict(f"delivery {delivery_id} is being sent right now", code="delivery_in_progress",
                       delivery_id=delivery_id)
    return row
