"""Per-instance ingest tokens: made at every rollout, stored as their SHA-256 only, and mapped
back to (instance, tenant) by the receiver.

Every rollout (a deployment, and the reconciler starting replicas: create, start, scale) issues
a new token. The tokens of the current release and of the release before it stay valid, so the
replicas of the previous release keep exporting until they are replaced; a redeploy deletes
those of older releases. A token of a
destroyed instance (or one deleted) maps to nothing. Lookups are cached for a few seconds, the
answer "no such token" included, so a sender with a bad token costs no query per export.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import UTC, datetime

from sqlalchemy import text

from libs.db import Database
from services.instances.otlp.decode import Owner

PREFIX = "otlp_"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, db: Database, *, ttl: float = 5.0):
        self.db = db
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Owner | None]] = {}

    async def issue(self, instance_id: str, tenant_id: str, release_id: str) -> str:
        token = PREFIX + secrets.token_urlsafe(32)
        async with self.db.session() as s:
            await s.execute(
                text(
                    "INSERT INTO instances.telemetry_tokens (token_hash, instance_id, tenant_id, release_id, "
                    "created_at) VALUES (:h, :i, :t, :r, :at)"
                ),
                {
                    "h": digest(token),
                    "i": instance_id,
                    "t": tenant_id,
                    "r": release_id,
                    "at": datetime.now(UTC),
                },
            )
            # Tokens of this release and of the release before it stay; older releases' go.
            await s.execute(
                text(
                    "DELETE FROM instances.telemetry_tokens WHERE instance_id = :i AND release_id <> :r "
                    "AND release_id <> COALESCE((SELECT release_id FROM instances.telemetry_tokens "
                    "WHERE instance_id = :i AND release_id <> :r ORDER BY created_at DESC LIMIT 1), '')"
                ),
                {"i": instance_id, "r": release_id},
            )
        return token

    async def owner(self, token: str) -> Owner | None:
        if not token.startswith(PREFIX):
            return None
        h = digest(token)
        hit = self._cache.get(h)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        async with self.db.session() as s:
            row = (
                await s.execute(
                    text(
                        "SELECT t.instance_id, t.tenant_id FROM instances.telemetry_tokens t "
                        "JOIN instances.instances i ON i.id = t.instance_id "
                        "WHERE t.token_hash = :h AND i.desired_state <> 'destroyed'"
                    ),
                    {"h": h},
                )
            ).first()
        owner = Owner(row[0], row[1]) if row else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[h] = (time.monotonic() + self.ttl, owner)
        return owner
