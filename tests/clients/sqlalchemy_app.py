"""The driver matrix's checks for SQLAlchemy 2 on asyncpg, configured as an application configures
it: an async engine from a URL with an SSL context in connect_args, its connection pool, an ORM
model and sessions with commit and rollback. Run through tests/clients/py_drivers.py (driver
`sqlalchemy`), which prints the same JSON lines for every driver.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any
from urllib.parse import quote

from sqlalchemy import String, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tests.clients.py_drivers import (
    LARGE_ROWS,
    SLEEP_SQL,
    SLEEPERS_SQL,
    bounded_async,
    cancel_task,
    run_async,
    ssl_context,
    until_sleeping,
)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


def make_engine(a: argparse.Namespace) -> AsyncEngine:
    url = f"postgresql+asyncpg://{quote(a.user)}:{quote(a.password)}@{a.host}:{a.port}/{a.database}"
    return create_async_engine(
        url, connect_args={"ssl": ssl_context(a), "timeout": 45}, pool_size=3, pool_pre_ping=True
    )


async def sqlalchemy_driver(a: argparse.Namespace) -> None:
    engine = make_engine(a)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    if a.phase == "wake":

        async def wake() -> dict[str, Any]:
            async with sessions() as s:
                return {"value": (await s.get_one(Item, 1)).name}

        await bounded_async("wake", wake())
        await engine.dispose()
        return

    async def connect() -> dict[str, Any]:
        async with engine.begin() as c:
            await c.run_sync(Base.metadata.create_all)
            row = (await c.execute(text("select current_user, current_database()"))).one()
        async with sessions() as s:
            s.add(Item(id=1, name="v0"))
            await s.commit()
        async with engine.connect() as c:
            raw = await c.get_raw_connection()
            transport = raw.driver_connection._transport  # type: ignore[union-attr]  # asyncpg shows TLS only here
            tls = transport.get_extra_info("ssl_object") is not None
        return {"user": row[0], "database": row[1], "tls": tls}

    async def param() -> dict[str, Any]:
        async with engine.connect() as c:
            row = (await c.execute(text("select :a + 1, :b || '!'"), {"a": 41, "b": "hi"})).one()
        return {"value": list(row)}

    async def large() -> dict[str, Any]:
        async with engine.connect() as c:
            sql = text("select repeat('x', 1024) from generate_series(1, :n)")
            rows = (await c.execute(sql, {"n": LARGE_ROWS})).all()
        return {"rows": len(rows), "bytes": sum(len(r[0]) for r in rows)}

    async def prepared() -> dict[str, Any]:
        # The same ORM query in three transactions: the asyncpg dialect prepares it once per
        # pooled connection and reuses the prepared statement from its cache.
        seen = []
        for i in (1, 2, 3):
            async with sessions() as s, s.begin():
                item = await s.get_one(Item, 1)
                item.name = f"v{i}"
                await s.flush()
                seen.append((await s.execute(select(Item.name).where(Item.id == 1))).scalar_one())
        async with sessions() as s:
            seen.append((await s.execute(select(Item.name).where(Item.id == 1))).scalar_one())
        return {"values": seen}

    async def rollback() -> dict[str, Any]:
        async with sessions() as s:
            s.add(Item(id=99, name="gone"))
            await s.flush()
            await s.rollback()
        async with sessions() as s:
            n = (await s.execute(select(func.count()).select_from(Item).where(Item.id == 99))).scalar_one()
        return {"count": n}

    async def cancel() -> dict[str, Any]:
        # An application's request timeout: the awaiting task is cancelled, asyncpg sends the
        # CancelRequest, and SQLAlchemy invalidates the connection (so no SQLSTATE reaches the
        # application). What must hold: the backend stops sleeping at once, and the pool's next
        # checkout works.
        async def sleep() -> None:
            async with engine.connect() as c:
                await c.execute(text(SLEEP_SQL))

        task = asyncio.create_task(sleep())
        async with engine.connect() as watcher:

            async def sleepers() -> Any:
                return (await watcher.execute(text(SLEEPERS_SQL))).scalar_one()

            await until_sleeping(sleepers)
        t0 = await cancel_task(task)
        if t0 is None:
            return {"error": "pg_sleep was not cancelled"}
        async with engine.connect() as c:
            after = (await c.execute(text("select 1"))).scalar_one()
            sleeping = -1
            while sleeping != 0 and time.monotonic() - t0 < 10:
                sleeping = (await c.execute(text(SLEEPERS_SQL))).scalar_one()
                await asyncio.sleep(0.05)
        return {"sleeping_after": sleeping, "seconds": round(time.monotonic() - t0, 2), "after": after}

    await run_async([connect, param, large, prepared, rollback, cancel])
    await engine.dispose()
