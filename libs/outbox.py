"""The event outbox: each service writes its events in the same transaction as the change, and
serves them in order, resumable from a sequence number (the SSE `id:`).

Watchers replay from the requested sequence, then wait for new rows: a publish in this process
wakes them at once, and a short poll catches rows written by other processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, MetaData, String, Table, insert, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from libs.db import Database
from libs.timeutil import now

# Marks a session that published, so only its commit wakes the watchers.
_PUBLISHED = "ctrlmesh.outbox.published"


def outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        Column("seq", BigInteger, primary_key=True, autoincrement=True),
        Column("type", String(100), nullable=False),
        Column("account_id", String(64), nullable=False, server_default=""),
        Column("tenant_id", String(64), nullable=False, server_default=""),
        Column("resource", String(64), nullable=False),
        Column("resource_id", String(128), nullable=False),
        Column("data", JSONB, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Index("ix_outbox_tenant", "tenant_id", "seq"),
    )


class Outbox:
    def __init__(self, table: Table, db: Database, poll_interval: float = 0.5):
        self.table = table
        self._db = db
        self._poll = poll_interval
        self._wake = asyncio.Condition()

    async def publish(
        self,
        session: AsyncSession,
        type_: str,
        *,
        resource: str,
        resource_id: str,
        data: dict[str, Any],
        tenant_id: str,
        account_id: str | ColumnElement[str],
    ) -> None:
        """Write an event in the caller's transaction; it is visible once that commits.

        Every event names its tenant and account (visibility filters of every stream read
        them); `account_id` may be a scalar subquery where only the owning row knows it."""
        session.info[_PUBLISHED] = True
        await session.execute(
            insert(self.table).values(
                type=type_,
                account_id=account_id,
                tenant_id=tenant_id,
                resource=resource,
                resource_id=resource_id,
                data=data,
                created_at=now(),
            )
        )

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One transaction that may publish: once it commits, local watchers are woken if it
        did (the publish-then-notify every writer needs; a rollback wakes nobody)."""
        async with self._db.session() as s:
            yield s
            published = s.info.pop(_PUBLISHED, False)
        if published:
            await self.notify()

    async def notify(self) -> None:
        """Wake local watchers after a commit."""
        async with self._wake:
            self._wake.notify_all()

    async def last_seq(self) -> int:
        async with self._db.session() as s:
            value = await s.scalar(select(self.table.c.seq).order_by(self.table.c.seq.desc()).limit(1))
        return int(value or 0)

    async def watch(
        self,
        after: int,
        where: Callable[[Table], ColumnElement[bool] | None],
        batch: int = 200,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield events with seq > after matching `where`, forever, in order."""
        t = self.table
        while True:
            cond = where(t)
            q = select(t).where(t.c.seq > after).order_by(t.c.seq).limit(batch)
            if cond is not None:
                q = q.where(cond)
            async with self._db.session() as s:
                rows = (await s.execute(q)).mappings().all()
            for row in rows:
                after = row["seq"]
                yield dict(row)
            if len(rows) == batch:
                continue
            async with self._wake:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._poll)
                except TimeoutError:
                    pass


def create_outbox_table(op: Any, schema: str) -> None:
    """The outbox as first created, for a service's initial migration (frozen: never edit;
    later changes to the outbox get migrations of their own)."""
    import sqlalchemy as sa

    op.create_table(
        "outbox",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("tenant_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("resource", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(128), nullable=False),
        sa.Column("data", JSONB, nullable=False),
        sa.Column("created_at", DateTime(timezone=True), nullable=False),
        schema=schema,
    )
    op.create_index("ix_outbox_tenant", "outbox", ["tenant_id", "seq"], schema=schema)
