from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Scope = Literal["read", "write", "admin"]
INTEGER_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1


class TenantQuotas(BaseModel):
    """Each empty quota is unlimited."""

    # Strict: `false` or "10" is not a quota (lax mode would read them as 0 and 10).
    model_config = ConfigDict(strict=True)

    # Bounded by the columns (BIGINT, INTEGER): a larger number is a 422 here on every database,
    # not an overflow inside SQLite's driver or PostgreSQL's.
    max_stored_bytes: int | None = Field(None, ge=0, le=BIGINT_MAX)
    max_models: int | None = Field(None, ge=0, le=INTEGER_MAX)
    max_datasets: int | None = Field(None, ge=0, le=INTEGER_MAX)
    max_active_jobs: int | None = Field(None, ge=0, le=INTEGER_MAX, description="queued and running jobs together")
    max_requests_per_minute: int | None = Field(None, gt=0, le=INTEGER_MAX)


class TenantCreate(TenantQuotas):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    name: str | None = Field(None, max_length=255)


class TenantRead(TenantQuotas):
    model_config = ConfigDict(from_attributes=True, strict=False)

    id: str
    name: str
    operator: bool
    created_at: datetime
    usage: dict[str, int] = {}


class ApiKeyCreate(BaseModel):
    scopes: list[Scope] = Field(min_length=1)
    name: str = Field("", max_length=255)
    expires_at: datetime | None = None
    # Only an operator's admin key may create a key for another tenant.
    tenant_id: str | None = None

    @field_validator("expires_at", mode="before")
    @classmethod
    def _iso_date_time(cls, value):
        # An ISO 8601 date-time, as the spec says; not a number read as seconds since 1970.
        if value is not None and not isinstance(value, (str, datetime)):
            raise ValueError("expires_at must be an ISO 8601 date-time string")
        return value


class ApiKeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant_id: str
    prefix: str
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyIssued(ApiKeyRead):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class AuditEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    key_prefix: str
    action: str
    resource_id: str
    at: datetime


class AuditList(BaseModel):
    items: list[AuditEventRead]
