"""Cursor pagination, newest first: the cursor is opaque to clients and stable under inserts."""

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.services.errors import ApiError

T = TypeVar("T")


@dataclass(frozen=True)
class PageRequest:
    """Which page: at most `limit` rows after `cursor` (None: the first page)."""

    limit: int = 20
    cursor: str | None = None


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """An opaque cursor pointing just after the row (created_at, id)."""
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor points after; 422 on a cursor this service did not hand out.

    A cursor is the client's to forge: anything but a UTC-convertible date and a plain id is refused here,
    since the database would otherwise fail on it (a date out of range, a NUL in the id).
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, row_id = json.loads(raw)
        if not isinstance(row_id, str) or "\x00" in row_id:
            raise ValueError("the id is not a plain string")
        after = datetime.fromisoformat(created_at)
        return (after.astimezone(UTC) if after.tzinfo else after.replace(tzinfo=UTC)), row_id
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ApiError(422, "invalid_request", "cursor: not a cursor from a previous page", "cursor") from exc


def paginate(
    session: Session,
    stmt: Select[tuple[T]],
    *,
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[str],
    page: PageRequest,
) -> tuple[list[T], str | None]:
    """One page of `stmt`'s rows newest first, and the cursor of the next page (None on the last)."""
    if page.cursor:
        after_ts, after_id = decode_cursor(page.cursor)
        stmt = stmt.where(or_(created_at < after_ts, and_(created_at == after_ts, row_id < after_id)))
    rows = list(session.scalars(stmt.order_by(created_at.desc(), row_id.desc()).limit(page.limit + 1)))
    if len(rows) <= page.limit:
        return rows, None
    rows = rows[: page.limit]
    last: Any = rows[-1]
    return rows, encode_cursor(last.created_at, last.id)
