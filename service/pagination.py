"""Cursor pagination, newest first, shared by every list endpoint."""

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from service.ids import decode_cursor, encode_cursor


def newest_first(*, session: Session, table, tenant_id: str, limit: int, cursor: str | None, where=(),
                 options=()) -> tuple[list, str | None]:
    query = select(table).where(table.tenant_id == tenant_id, *where).options(*options)
    if cursor:
        created_at, row_id = decode_cursor(cursor)
        query = query.where(tuple_(table.created_at, table.id) < tuple_(created_at, row_id))
    rows = list(session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at, last.id)
