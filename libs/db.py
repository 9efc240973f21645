"""PostgreSQL access for services: one async engine per process, one session per RPC, and
Alembic migrations per service schema applied at start.

Reads that are one statement (or a few independent ones) go through `Database.read`: an
autocommit connection, so PostgreSQL sees the statement alone, with no BEGIN and COMMIT round
trips around it. There is no pre-ping on checkout: a pooled connection whose socket PostgreSQL
closed (a restart, an idle timeout) is discarded at checkout without a round trip, connections
are recycled after `POOL_RECYCLE` seconds, and a read that still meets a dead connection is
retried once on a fresh one, so a restarted PostgreSQL does not fail the first request.
asyncpg's prepared statements are cached per connection (`PREPARED_STATEMENT_CACHE`), so a hot
statement is parsed and planned once per connection, not once per call.

Each service owns one schema (accounts, databases, ...) and its own Alembic version table in it,
so services migrate independently; a transaction-scoped advisory lock serialises concurrent
starts of the same service.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import event, exc, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

T = TypeVar("T")

# Seconds a pooled connection lives before it is replaced (server-side idle timeouts, failovers).
POOL_RECYCLE = 1800
# Prepared statements asyncpg keeps per connection (SQLAlchemy's asyncpg dialect; 0 = none).
PREPARED_STATEMENT_CACHE = 256


def _discard_closed(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Checkout: a connection whose socket the server closed is swapped for a fresh one (the
    pool retries on DisconnectionError). asyncpg knows from the socket: no round trip."""
    raw = getattr(dbapi_connection, "_connection", None)
    if raw is not None and raw.is_closed():
        raise exc.DisconnectionError("the pooled connection was closed by the server")


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=10,
        pool_recycle=POOL_RECYCLE,
        connect_args={"prepared_statement_cache_size": PREPARED_STATEMENT_CACHE},
    )
    event.listen(engine.sync_engine.pool, "checkout", _discard_closed)
    return engine


class Database:
    """The engine and session factories a service builds once and passes to its repository."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._reads = async_sessionmaker(
            engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        )

    async def single(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """`fn`, one write statement, on an autocommit connection: it commits by itself (no
        BEGIN/COMMIT round trips). Not retried: a statement that reached the server may have
        committed before its connection died."""
        async with self._reads() as s:
            return await fn(s)

    async def read(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """`fn` on an autocommit connection: each statement alone (no BEGIN/COMMIT), for reads
        that need no snapshot across statements. Retried once when its connection proves dead
        (the pool is invalidated by then, so the retry gets a fresh one)."""
        try:
            async with self._reads() as s:
                return await fn(s)
        except exc.DBAPIError as err:
            if not err.connection_invalidated:
                raise
        async with self._reads() as s:
            return await fn(s)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on error."""
        async with self.sessions() as s, s.begin():
            yield s

    async def dispose(self) -> None:
        await self.engine.dispose()


def advisory_key(namespace: str, value: str) -> int:
    """The 64-bit PostgreSQL advisory-lock key of (namespace, value): the one hashing of it."""
    return int.from_bytes(
        hashlib.sha256(f"ctrlmesh-{namespace}:{value}".encode()).digest()[:8], "big", signed=True
    )


async def xact_lock(s: AsyncSession, namespace: str, value: str) -> None:
    """Hold an advisory lock on (namespace, value) until the session's transaction ends: for
    invariants over rows that may not exist yet (quotas, plan caps), where no row can be locked."""
    await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key(namespace, value)})


def _upgrade(conn: Connection, schema: str, script_location: Path) -> None:
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("migrate", schema)})
    conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["connection"] = conn
    cfg.attributes["schema"] = schema
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine, schema: str, script_location: Path) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, schema, script_location)
