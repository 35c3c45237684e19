"""`/v1/webhooks`: a tenant's endpoints and their deliveries. Registering and removing endpoints
takes the write scope; reading them the read scope. The secret is in the create answer only."""

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service.audit import service as audit
from service.auth import ReadCaller, WriteCaller
from service.deps import ContextDep, SessionDep
from service.webhooks import service
from service.webhooks.schemas import DeliveryList, DeliveryRead, WebhookCreate, WebhookCreated, WebhookList, WebhookRead

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", status_code=201, response_model=WebhookCreated)
def create_webhook(body: WebhookCreate, context: ContextDep, session: SessionDep, caller: WriteCaller):
    """Deliveries are signed per Standard Webhooks with the secret shown here once; verify them
    with `modelpress.webhooks.verify`."""
    settings = context.settings
    row = service.create(session=session, tenant_id=caller.tenant_id, body=body, max_endpoints=settings.webhook_max_endpoints,
                         max_url_length=settings.webhook_url_max_length,
                         private_urls_allowed=settings.webhook_private_urls_allowed)
    audit.record(session=session, caller=caller, action="webhook.created", resource_id=row.id)
    return WebhookCreated(**WebhookRead.model_validate(row).model_dump(), secret=row.secret)


@router.get("", response_model=WebhookList)
def list_webhooks(session: SessionDep, caller: ReadCaller):
    return WebhookList(items=service.list_all(session=session, tenant_id=caller.tenant_id))


@router.get("/{webhook_id}", response_model=WebhookRead)
def get_webhook(webhook_id: str, session: SessionDep, caller: ReadCaller):
    return service.get(session=session, tenant_id=caller.tenant_id, endpoint_id=webhook_id)


@router.delete("/{webhook_id}", status_code=204)
def delete_webhook(webhook_id: str, session: SessionDep, caller: WriteCaller):
    service.delete(session=session, tenant_id=caller.tenant_id, endpoint_id=webhook_id)
    audit.record(session=session, caller=caller, action="webhook.deleted", resource_id=webhook_id)
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList)
def list_deliveries(webhook_id: str, session: SessionDep, caller: ReadCaller,
                    limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None):
    rows, next_cursor = service.list_deliveries(session=session, tenant_id=caller.tenant_id, endpoint_id=webhook_id,
                                                limit=limit, cursor=cursor)
    return DeliveryList(items=rows, next_cursor=next_cursor)


@router.get("/{webhook_id}/deliveries/{delivery_id}", response_model=DeliveryRead)
def get_delivery(webhook_id: str, delivery_id: str, session: SessionDep, caller: ReadCaller):
    return service.get_delivery(session=session, tenant_id=caller.tenant_id, endpoint_id=webhook_id, delivery_id=delivery_id)


@router.post("/{webhook_id}/deliveries/{delivery_id}/resend", status_code=202, response_model=DeliveryRead)
def resend_delivery(webhook_id: str, delivery_id: str, session: SessionDep, caller: WriteCaller):
    row = service.resend(session=session, tenant_id=caller.tenant_id, endpoint_id=webhook_id, delivery_id=delivery_id)
    audit.record(session=session, caller=caller, action="webhook.delivery_resent", resource_id=delivery_id)
    return row
