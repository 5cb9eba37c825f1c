"""Cursor pagination, newest first: the cursor is opaque to clients and stable under inserts.

A cursor names the list it came from (its table): one of another list, one this service did not hand out,
or anything else malformed is a 400, never ignored (a client that sent its own idea of a cursor would
otherwise get page 1 back for ever).
"""

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


def encode_cursor(kind: str, created_at: datetime, row_id: str) -> str:
    """An opaque cursor of the list `kind` pointing just after the row (created_at, id)."""
    raw = json.dumps([kind, created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor of the list `kind` points after; 400 on any other cursor.

    A cursor is the client's to forge: anything but this list's name, a UTC-convertible date and a plain id
    is refused here, since the database would otherwise fail on it (a date out of range, a NUL in the id).
    """
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"=" * (-len(cursor) % 4))
        cursor_kind, created_at, row_id = json.loads(raw)
        if cursor_kind != kind:
            raise ValueError("a cursor of another list")
        if not isinstance(row_id, str) or "\x00" in row_id:
            raise ValueError("the id is not a plain string")
        after = datetime.fromisoformat(created_at)
        return (after.astimezone(UTC) if after.tzinfo else after.replace(tzinfo=UTC)), row_id
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ApiError(
            400, "invalid_cursor", "cursor: not a cursor of this list; pass the previous page's `next_cursor`", "cursor"
        ) from exc


def paginate(
    session: Session,
    stmt: Select[tuple[T]],
    *,
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[str],
    page: PageRequest,
) -> tuple[list[T], str | None]:
    """One page of `stmt`'s rows newest first, and the cursor of the next page (None on the last)."""
    kind = row_id.class_.__tablename__
    if page.cursor is not None:
        after_ts, after_id = decode_cursor(page.cursor, kind)
        stmt = stmt.where(or_(created_at < after_ts, and_(created_at == after_ts, row_id < after_id)))
    rows = list(session.scalars(stmt.order_by(created_at.desc(), row_id.desc()).limit(page.limit + 1)))
    if len(rows) <= page.limit:
        return rows, None
    rows = rows[: page.limit]
    last: Any = rows[-1]
    return rows, encode_cursor(kind, last.created_at, last.id)
