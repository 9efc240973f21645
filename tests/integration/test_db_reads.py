"""libs/db.py against a real PostgreSQL: a read sends its statement alone (no BEGIN/COMMIT), the
budget tally counts every round trip, and a connection PostgreSQL closed under the pool fails
no request (no pre-ping: discarded at checkout, or the read retried once)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from libs import budget
from libs.db import PREPARED_STATEMENT_CACHE, Database, make_engine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    engine = make_engine(database_url, pool_size=1)
    budget.instrument_engine(engine)
    d = Database(engine)
    yield d
    await d.dispose()


async def _one(s: AsyncSession) -> int:
    return int(await s.scalar(text("SELECT 1")) or 0)


async def test_read_is_one_round_trip_and_a_session_three(db: Database):
    """`read` runs SELECT alone (1 round trip); `session` wraps it in BEGIN/COMMIT (3)."""
    assert not db.engine.sync_engine.pool._pre_ping
    with budget.tally("test", "read") as t:
        assert await db.read(_one) == 1
    assert (t.sql, t.peer) == (1, 0)
    with budget.tally("test", "session") as t:
        async with db.session() as s:
            await _one(s)
    assert t.sql == 3


async def test_statements_are_prepared_once_per_connection(db: Database):
    """asyncpg's prepared statement cache is on: the same SELECT is prepared once, then reused."""
    for _ in range(3):
        await db.read(_one)
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        cache = raw.dbapi_connection._prepared_statement_cache  # type: ignore[union-attr]
        assert cache is not None and cache.capacity == PREPARED_STATEMENT_CACHE
        assert any("SELECT 1" in str(k) for k in cache)


async def test_a_connection_closed_by_the_server_is_replaced_at_checkout(db: Database, database_url: str):
    """The pooled connection's backend is terminated: the next read still answers, no pre-ping."""
    pid = await db.read(lambda s: s.scalar(text("SELECT pg_backend_pid()")))
    killer = make_engine(database_url, pool_size=1)
    try:
        async with killer.connect() as other:
            assert await other.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await killer.dispose()
    await asyncio.sleep(0.2)  # the server's close reaches the pooled socket
    with budget.tally("test", "after-kill") as t:
        assert await db.read(lambda s: s.scalar(text("SELECT pg_backend_pid()"))) != pid
    assert t.sql == 1


async def test_a_read_on_a_connection_that_dies_under_it_is_retried_once(db: Database):
    """The first attempt's backend dies mid-read (not seen at checkout): the read is retried on a fresh one."""
    attempts = 0

    async def dies_first(s: AsyncSession) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await s.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return await _one(s)

    assert await db.read(dies_first) == 1
    assert attempts == 2
