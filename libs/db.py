"""PostgreSQL access for services: one async engine per process, one session per RPC, and
Alembic migrations per service schema applied at start.

Each service owns one schema (accounts, databases, ...) and its own Alembic version table in it,
so services migrate independently; a transaction-scoped advisory lock serialises concurrent
starts of the same service.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)


class Database:
    """The engine and session factory a service builds once and passes to its repository."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)

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
