"""Time as the control plane records it: timezone-aware UTC, one definition for every service."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)
