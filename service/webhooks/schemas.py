from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EventType = Literal["job.succeeded", "job.failed", "job.cancelled", "job.progress"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Checked by the service (scheme, host, length, address) so each refusal has its own code.
    url: str = Field(min_length=1, max_length=4096)
    event_types: list[EventType] = Field(default=["job.succeeded", "job.failed", "job.cancelled"], min_length=1,
                                         max_length=4)
    # Standard Webhooks' form, whsec_<base64 of 24 to 64 bytes>; left out, one is made.
    secret: str | None = Field(None, max_length=128)
    description: str = Field("", max_length=255)


class WebhookRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    url: str
    event_types: list[str]
    description: str
    created_at: datetime


class WebhookCreated(WebhookRead):
    """The one answer that shows the secret."""

    secret: str


class WebhookList(BaseModel):
    items: list[WebhookRead]


class DeliveryRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    endpoint_id: str
    job_id: str
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime


class DeliveryList(BaseModel):
    items: list[DeliveryRead]
    next_cursor: str | None
