"""Conversions between protobuf well-known types and Python values, shared by every servicer."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for a datetime; None stays None (the field is left unset, JSON null)."""
    if value is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def dt(value: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    """A UTC datetime for a Timestamp field, or None when the field was not set."""
    return value.ToDatetime(tzinfo=UTC) if present else None
