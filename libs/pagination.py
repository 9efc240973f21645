"""Opaque, stable list cursors for Ctrl Plane lists.

Lists are ordered newest first by id (TypeIDs sort by creation time), so a cursor only needs the
last id served: the next page is `id < last`. Rows created meanwhile never shift a page.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from libs.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        # ValueError: a non-ASCII cursor (binascii.Error is one too); the ids we encode are ASCII.
        raw = ""
    if not raw.startswith("v1:") or len(raw) < 4 or not raw.isprintable():
        raise InvalidArgument("invalid cursor", fields={"cursor": "not a cursor this API returned"})
    return raw[3:]


def page_limit(limit: int, default: int = DEFAULT_LIMIT) -> int:
    return min(limit, MAX_LIMIT) if limit > 0 else default


def next_page(rows: Sequence[T], n: int, id_of: Callable[[T], str]) -> tuple[list[T], str]:
    """Split the `n + 1` rows a query fetched into the page and the cursor of the next page
    (empty when this is the last one): fetching one extra row tells whether more exist."""
    return list(rows[:n]), encode_cursor(id_of(rows[n - 1])) if len(rows) > n else ""


async def keyset_page(
    session: AsyncSession, query: Select[Any], id_col: Any, cursor: str, limit: int, default: int
) -> tuple[list[Any], str, int]:
    """One page of an ORM query, newest id first: (items, next_cursor, total of all matches)."""
    after = decode_cursor(cursor)
    n = page_limit(limit, default)
    total = await session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if after:
        query = query.where(id_col < after)
    rows = list(await session.scalars(query.order_by(id_col.desc()).limit(n + 1)))
    items, next_cursor = next_page(rows, n, lambda r: r.id)
    return items, next_cursor, total
