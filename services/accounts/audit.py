"""The platform's audit log: entries recorded by every service's audit interceptor, queried by
the Ctrl Plane admin."""

from __future__ import annotations

from typing import Any

from libs import ids
from libs.db import Database
from libs.principal import Principal
from libs.timeutil import now
from services.accounts import repository as repo
from services.accounts.access import require_global, require_system
from services.accounts.repository import AuditRow


class Audit:
    def __init__(self, db: Database):
        self.db = db

    async def record(self, entry: dict[str, Any]) -> None:
        """Store one entry (from this process's own interceptor: trusted): one INSERT that
        commits by itself."""
        values = {**entry, "id": ids.new_id("aud"), "created_at": now()}
        await self.db.single(lambda s: repo.insert_audit(s, values))

    async def record_from(self, p: Principal, entry: dict[str, Any]) -> None:
        """Store an entry another service sent (RecordAudit: a system caller only)."""
        require_system(p)
        await self.record(entry)

    async def query(
        self, p: Principal, filters: dict[str, Any], cursor: str, limit: int
    ) -> tuple[list[AuditRow], str, int]:
        require_global(p)
        async with self.db.session() as s:
            return await repo.audit_page(s, filters, cursor, limit)
