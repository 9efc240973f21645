"""The journal of operations that span services, so a `kill -9` half-way leaves nothing behind.

A managed database is a backing database in the databases service plus our row; a template's
instantiation is an app in the instances service, maybe a managed database, a binding and a
deployment. Each is several calls to other services, and a process that dies between them would
leave what it made so far with nothing pointing at it: a database no managed row names, an app
whose instantiation the caller saw fail. So the operation writes an intent before its first
remote step, notes what it made as it goes (the app's id once known; the names are known
before the calls, so even a create whose answer was lost is found), and deletes the intent in the
same transaction that records the outcome (or after undoing a failure). At start, every intent
left is an operation a dead process was in: `recover` undoes what it made, newest step first,
exactly as the in-process undo would have, and then deletes the intent.

One clusters process per control plane (as the launcher runs it): a second process starting
would take the first one's live operations for dead ones.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC
from typing import Any

from sqlalchemy import delete, select, update

from libs import principal as principals
from libs.timeutil import now
from services.clusters.models import intents, managed_databases
from services.clusters.peers import Databases, Instances

log = logging.getLogger("ctrlmesh.clusters.intents")

SYSTEM = principals.system_principal("clusters")


class Intents:
    def __init__(self, db: Any, databases: Databases, instances: Instances):
        self.db = db
        self.databases = databases
        self.instances = instances

    async def begin(self, kind: str, tenant_id: str, *, app_name: str = "", pg_name: str = "") -> str:
        intent_id = str(uuid.uuid4())
        async with self.db.session() as s:
            await s.execute(
                intents.insert().values(
                    id=intent_id,
                    kind=kind,
                    tenant_id=tenant_id,
                    app_name=app_name or None,
                    pg_name=pg_name or None,
                    created_at=now(),
                )
            )
        return intent_id

    async def note(self, intent_id: str, **values: Any) -> None:
        """What the operation made so far (the app's id, the backing database's name)."""
        async with self.db.session() as s:
            await s.execute(update(intents).where(intents.c.id == intent_id).values(**values))

    @staticmethod
    async def finish_in(s: Any, intent_id: str) -> None:
        """Delete the intent inside the caller's transaction (the one recording the outcome)."""
        await s.execute(delete(intents).where(intents.c.id == intent_id))

    async def finish(self, intent_id: str) -> None:
        async with self.db.session() as s:
            await self.finish_in(s, intent_id)

    async def recover(self) -> int:
        """Undo the operations a dead process left half-made; how many intents were resolved."""
        async with self.db.session() as s:
            rows = (await s.execute(select(intents).order_by(intents.c.created_at))).mappings().all()
        for row in rows:
            await self._undo(dict(row))
            await self.finish(row["id"])
            log.warning(
                "undid a %s of tenant %s its process died in (app %s, database %s)",
                row["kind"],
                row["tenant_id"],
                row["app_id"] or row["app_name"] or "-",
                row["pg_name"] or "-",
            )
        return len(rows)

    async def _undo(self, row: dict[str, Any]) -> None:
        tenant_id, since = row["tenant_id"], row["created_at"]
        if row["pg_name"]:
            # Only what this operation made: a managed row or a backing database of that name
            # older than the intent is another operation's (the create was refused as a duplicate).
            async with self.db.session() as s:
                await s.execute(
                    delete(managed_databases).where(
                        managed_databases.c.tenant_id == tenant_id,
                        managed_databases.c.pg_name == row["pg_name"],
                        managed_databases.c.created_at >= since,
                    )
                )
            backing = await self.databases.get_named(tenant_id, row["pg_name"])
            if backing is not None and backing.created_at.ToDatetime(tzinfo=UTC) >= since:
                await self.databases.delete(tenant_id, row["pg_name"])
        app_id = row["app_id"]
        if not app_id and row["app_name"]:
            app_id = next(
                (
                    i.id
                    for i in await self.instances.all(SYSTEM)
                    if i.tenant_id == tenant_id
                    and i.name == row["app_name"]
                    and i.created_at.ToDatetime(tzinfo=UTC) >= since
                ),
                None,
            )
        if app_id:
            await self.instances.delete(SYSTEM, app_id)
