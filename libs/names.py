"""Names derived from what users type: one slug rule for tenants, instances and whatever follows."""

from __future__ import annotations

import re

_NOT_SLUG = re.compile(r"[^a-z0-9]+")


def slugify(name: str, fallback: str) -> str:
    """A DNS label from `name`: lowercase ASCII letters, digits and single inner dashes, at most
    63 characters; `fallback` when nothing of the name survives."""
    slug = _NOT_SLUG.sub("-", name.lower()).strip("-")
    return slug[:63].strip("-") or fallback
