"""Resource ids and opaque list cursors."""

import base64
import json
import uuid
from datetime import datetime

from modelpress.spec.errors import Invalid


def new_id(prefix: str) -> str:
    """Ids carry their kind ("mdl_", "ds_", "job_") so a wrong id in the wrong place reads clearly."""
    return f"{prefix}_{uuid.uuid4().hex}"


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, row_id = json.loads(raw)
        if not isinstance(row_id, str) or not row_id.isprintable() or len(row_id) > 64:
            raise ValueError("not an id")
        return datetime.fromisoformat(created_at), row_id
    except Exception as exc:
        raise Invalid("the cursor is not one this API returned", code="invalid_cursor") from exc


def clean_name(name: str) -> str:
    """A display name without control characters (PostgreSQL refuses NUL in text), at most 255."""
    return "".join(c for c in name if c.isprintable())[:255] or "unnamed"
