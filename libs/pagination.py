"""Opaque, stable list cursors for Ctrl Plane lists.

Lists are ordered newest first by id (TypeIDs sort by creation time), so a cursor only needs the
last id served: the next page is `id < last`. Rows created meanwhile never shift a page.
"""

from __future__ import annotations

import base64
import binascii

from libs.errors import InvalidArgument

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raw = ""
    if not raw.startswith("v1:") or len(raw) < 4:
        raise InvalidArgument("invalid cursor", fields={"cursor": "not a cursor this API returned"})
    return raw[3:]


def page_limit(limit: int, default: int = DEFAULT_LIMIT) -> int:
    return min(limit, MAX_LIMIT) if limit > 0 else default
