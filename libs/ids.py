"""Identifiers: TypeIDs for Ctrl Plane resources, UUIDs for databases, clusters and nodes.

A TypeID is `prefix_` + 26 Crockford base32 characters of a UUIDv7, so ids sort by creation
time; that ordering is what makes our list cursors stable.
"""

from __future__ import annotations

import uuid

from typeid import TypeID

PREFIXES = frozenset(
    {"inst", "dep", "rel", "chk", "hres", "dom", "rte", "cert", "sec", "ten", "aud", "evt", "key", "acct"}
)


def new_id(prefix: str) -> str:
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    return str(TypeID(prefix))


def is_id(value: str, prefix: str) -> bool:
    """True when `value` is a well-formed TypeID with this prefix."""
    try:
        return TypeID.from_string(value).prefix == prefix
    except Exception:
        return False


def new_uuid() -> str:
    return str(uuid.uuid4())


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# The `main` cluster (the configured Docker engine) has a fixed id, so the instances service
# knows which instances run on the configured engine without asking the clusters service (a
# restart of either never makes those instances wait for the other).
MAIN_CLUSTER_ID = str(uuid.uuid5(uuid.UUID("5b0c7a3e-8f61-4a53-9d6e-2f1d9e0b7c41"), "ctrlmesh/cluster/main"))
