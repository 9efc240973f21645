"""The driver matrix's checks for the Python drivers, one driver per run, so psycopg's libpq can be
chosen per run (PSYCOPG_IMPL=python loads the system's libpq, `binary` the wheel's).

    python -m tests.clients.py_drivers DRIVER PHASE HOST PORT USER PASSWORD DATABASE CA_PEM

DRIVER is psycopg-sync, psycopg-async, asyncpg or sqlalchemy; PHASE is `main` (connect, a
parameterized query, a large result, a prepared statement reused across transactions, a rolled
back transaction, cancel of a running pg_sleep) or `wake` (the data `main` left, read after the
database was stopped). Every check prints one JSON line, {"check": name, ...} with what it saw, or
{"check": name, "error": ...}; tests/e2e/test_pg_drivers.py asserts on them. Each check is bounded
by a timeout, so a hang is reported as an error instead of sticking.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

LARGE_ROWS = 4096  # of 1 KiB each: a 4 MiB result
CHECK_TIMEOUT = 30.0
PARAM_SQL = "select {a}::int + 1, {b}::text || '!'"
SLEEP_SQL = "select pg_sleep(30)"
UPDATE_SQL = "update kv set v = {v} where k = 1"
SELECT_SQL = "select v from kv where k = {k}"
# The cancel checks cancel only once the server runs the sleep, seen from a second connection: a
# CancelRequest that arrives before the query would be lost, and the check would wait 30 s.
SLEEPERS_SQL = (
    "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'"
)
SLEEP_SEEN_WITHIN = 10.0


def emit(check: str, **fields: Any) -> None:
    print(json.dumps({"check": check, **fields}), flush=True)


def bounded_sync(name: str, fn: Callable[[], dict[str, Any]], timeout: float = CHECK_TIMEOUT) -> None:
    """Run fn in a thread; report its result, its failure, or that it did not finish in time."""
    result: list[dict[str, Any]] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # reported as this check's error; the thread must not die silently
            failure.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        emit(name, error=f"no answer in {timeout:.0f} s")
        sys.exit(1)  # the connection is stuck mid-protocol: nothing after this can be trusted
    if failure:
        emit(name, error=repr(failure[0]))
    else:
        emit(name, **result[0])


def run_sync(checks: list[Callable[[], dict[str, Any]]]) -> None:
    """Each check in order, named by its function, each bounded."""
    for check in checks:
        bounded_sync(check.__name__, check)


async def run_async(checks: list[Callable[[], Awaitable[dict[str, Any]]]]) -> None:
    for check in checks:
        await bounded_async(check.__name__, check())


async def until_sleeping(sleepers: Callable[[], Awaitable[Any]]) -> None:
    """Wait until a second connection sees the sleep running (at most SLEEP_SEEN_WITHIN)."""
    deadline = time.monotonic() + SLEEP_SEEN_WITHIN
    while await sleepers() != 1:
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)


async def cancel_task(task: asyncio.Task[Any]) -> float | None:
    """Cancel the task running a query: when it was cancelled (monotonic), or None when it had
    ended by itself."""
    t0 = time.monotonic()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return t0
    return None


async def bounded_async(name: str, coro: Awaitable[dict[str, Any]]) -> None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            fields = await coro
    except TimeoutError:
        emit(name, error=f"no answer in {CHECK_TIMEOUT:.0f} s")
        sys.exit(1)
    except Exception as exc:  # reported as this check's error
        emit(name, error=repr(exc))
    else:
        emit(name, **fields)


# -- psycopg 3 ---------------------------------------------------------------------------------


def psycopg_conninfo(a: argparse.Namespace) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(
        host=a.host,
        port=a.port,
        user=a.user,
        password=a.password,
        dbname=a.database,
        sslmode="verify-full",
        sslrootcert=a.ca,
        connect_timeout=45,  # past the gateway's 30 s wake timeout: its own error, not ours
    )


def psycopg_connected(conn: Any, row: Any) -> dict[str, Any]:
    """What the connect check reports for either psycopg connection class."""
    import psycopg

    return {
        "user": row[0],
        "database": row[1],
        "tls": conn.pgconn.ssl_in_use,
        "libpq": psycopg.pq.version(),
        "impl": psycopg.pq.__impl__,
    }


def psycopg_sync(a: argparse.Namespace) -> None:
    import psycopg

    conn: psycopg.Connection[Any] = psycopg.connect(psycopg_conninfo(a))
    if a.phase == "wake":
        bounded_sync("wake", lambda: {"value": conn.execute(SELECT_SQL.format(k="%s"), (1,)).fetchone()[0]})  # type: ignore[index]
        return

    def connect() -> dict[str, Any]:
        row = conn.execute("select current_user, current_database()").fetchone()
        assert row is not None
        conn.execute("create table kv (k int primary key, v text)")
        conn.execute("insert into kv values (1, 'v0')")
        conn.commit()
        return psycopg_connected(conn, row)

    def param() -> dict[str, Any]:
        row = conn.execute(PARAM_SQL.format(a="%s", b="%s"), (41, "hi")).fetchone()
        conn.commit()
        return {"value": list(row or ())}

    def large() -> dict[str, Any]:
        rows = conn.execute("select repeat('x', 1024) from generate_series(1, %s)", (LARGE_ROWS,)).fetchall()
        conn.commit()
        return {"rows": len(rows), "bytes": sum(len(r[0]) for r in rows)}

    def prepared() -> dict[str, Any]:
        seen = []
        for i in (1, 2, 3):  # one transaction each; prepare=True names the statement on the server
            conn.execute(UPDATE_SQL.format(v="%s"), (f"v{i}",))
            seen.append(conn.execute(SELECT_SQL.format(k="%s"), (1,), prepare=True).fetchone()[0])  # type: ignore[index]
            conn.commit()
        seen.append(conn.execute(SELECT_SQL.format(k="%s"), (1,), prepare=True).fetchone()[0])  # type: ignore[index]
        conn.commit()
        return {"values": seen}

    def rollback() -> dict[str, Any]:
        conn.execute("insert into kv values (99, 'gone')")
        conn.rollback()
        row = conn.execute("select count(*) from kv where k = 99").fetchone()
        conn.commit()
        return {"count": row[0] if row else None}

    def cancel_when_sleeping() -> None:
        with psycopg.connect(psycopg_conninfo(a), autocommit=True) as watcher:
            deadline = time.monotonic() + SLEEP_SEEN_WITHIN
            while watcher.execute(SLEEPERS_SQL).fetchone() != (1,) and time.monotonic() < deadline:
                time.sleep(0.02)
        conn.cancel_safe()

    def cancel() -> dict[str, Any]:
        timer = threading.Thread(target=cancel_when_sleeping, daemon=True)
        timer.start()
        t0 = time.monotonic()
        try:
            conn.execute(SLEEP_SQL)
            return {"error": "pg_sleep was not cancelled"}
        except psycopg.errors.QueryCanceled as exc:
            took = time.monotonic() - t0
            conn.rollback()
            after = conn.execute("select 1").fetchone()
            conn.commit()
            return {"sqlstate": exc.sqlstate, "seconds": round(took, 2), "after": after[0] if after else None}
        finally:
            timer.join(SLEEP_SEEN_WITHIN + 5)

    run_sync([connect, param, large, prepared, rollback, cancel])
    conn.close()


async def psycopg_async(a: argparse.Namespace) -> None:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(psycopg_conninfo(a))

    async def one(sql: str, params: Any = None, prepare: bool | None = None) -> Any:
        cur = await conn.execute(sql, params, prepare=prepare)
        row = await cur.fetchone()
        assert row is not None
        return row

    if a.phase == "wake":

        async def wake() -> dict[str, Any]:
            return {"value": (await one(SELECT_SQL.format(k="%s"), (1,)))[0]}

        await bounded_async("wake", wake())
        return

    async def connect() -> dict[str, Any]:
        row = await one("select current_user, current_database()")
        await conn.execute("create table kv (k int primary key, v text)")
        await conn.execute("insert into kv values (1, 'v0')")
        await conn.commit()
        return psycopg_connected(conn, row)

    async def param() -> dict[str, Any]:
        row = await one(PARAM_SQL.format(a="%s", b="%s"), (41, "hi"))
        await conn.commit()
        return {"value": list(row)}

    async def large() -> dict[str, Any]:
        cur = await conn.execute("select repeat('x', 1024) from generate_series(1, %s)", (LARGE_ROWS,))
        rows = await cur.fetchall()
        await conn.commit()
        return {"rows": len(rows), "bytes": sum(len(r[0]) for r in rows)}

    async def prepared() -> dict[str, Any]:
        seen = []
        for i in (1, 2, 3):
            await conn.execute(UPDATE_SQL.format(v="%s"), (f"v{i}",))
            seen.append((await one(SELECT_SQL.format(k="%s"), (1,), prepare=True))[0])
            await conn.commit()
        seen.append((await one(SELECT_SQL.format(k="%s"), (1,), prepare=True))[0])
        await conn.commit()
        return {"values": seen}

    async def rollback() -> dict[str, Any]:
        await conn.execute("insert into kv values (99, 'gone')")
        await conn.rollback()
        row = await one("select count(*) from kv where k = 99")
        await conn.commit()
        return {"count": row[0]}

    async def cancel() -> dict[str, Any]:
        async def later() -> None:
            async with await psycopg.AsyncConnection.connect(psycopg_conninfo(a), autocommit=True) as w:

                async def sleepers() -> Any:
                    row = await (await w.execute(SLEEPERS_SQL)).fetchone()
                    return row[0] if row else None

                await until_sleeping(sleepers)
            await conn.cancel_safe()

        canceller = asyncio.create_task(later())
        t0 = time.monotonic()
        try:
            await conn.execute(SLEEP_SQL)
            return {"error": "pg_sleep was not cancelled"}
        except psycopg.errors.QueryCanceled as exc:
            took = time.monotonic() - t0
            await conn.rollback()
            after = await one("select 1")
            await conn.commit()
            return {"sqlstate": exc.sqlstate, "seconds": round(took, 2), "after": after[0]}
        finally:
            await canceller

    await run_async([connect, param, large, prepared, rollback, cancel])
    await conn.close()


# -- asyncpg -----------------------------------------------------------------------------------


def ssl_context(a: argparse.Namespace) -> ssl.SSLContext:
    """verify-full: the gateway's CA, and its certificate must name the host."""
    return ssl.create_default_context(cafile=a.ca)


async def asyncpg_connect(a: argparse.Namespace) -> Any:
    import asyncpg

    return await asyncpg.connect(
        host=a.host,
        port=a.port,
        user=a.user,
        password=a.password,
        database=a.database,
        ssl=ssl_context(a),
        timeout=45,
    )


async def asyncpg_driver(a: argparse.Namespace) -> None:
    import asyncpg

    # The default statement cache: every query below is prepared on the server and reused.
    conn = await asyncpg_connect(a)
    if a.phase == "wake":

        async def wake() -> dict[str, Any]:
            return {"value": await conn.fetchval(SELECT_SQL.format(k="$1"), 1)}

        await bounded_async("wake", wake())
        return

    async def connect() -> dict[str, Any]:
        row = await conn.fetchrow("select current_user, current_database()")
        await conn.execute("create table kv (k int primary key, v text)")
        await conn.execute("insert into kv values (1, 'v0')")
        transport = conn._transport  # asyncpg exposes the TLS state nowhere else
        return {
            "user": row[0],
            "database": row[1],
            "tls": transport.get_extra_info("ssl_object") is not None,
        }

    async def param() -> dict[str, Any]:
        return {"value": list(await conn.fetchrow(PARAM_SQL.format(a="$1", b="$2"), 41, "hi"))}

    async def large() -> dict[str, Any]:
        rows = await conn.fetch("select repeat('x', 1024) from generate_series(1, $1)", LARGE_ROWS)
        return {"rows": len(rows), "bytes": sum(len(r[0]) for r in rows)}

    async def prepared() -> dict[str, Any]:
        stmt = await conn.prepare(SELECT_SQL.format(k="$1"))
        seen = []
        for i in (1, 2, 3):
            async with conn.transaction():
                await conn.execute(UPDATE_SQL.format(v="$1"), f"v{i}")
                seen.append(await stmt.fetchval(1))
        seen.append(await stmt.fetchval(1))
        return {"values": seen}

    async def rollback() -> dict[str, Any]:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("insert into kv values (99, 'gone')")
        await tx.rollback()
        return {"count": await conn.fetchval("select count(*) from kv where k = 99")}

    async def cancel() -> dict[str, Any]:
        # asyncpg's cancel API is task cancellation: it sends a CancelRequest and swallows the
        # backend's answer. That answer was an error (57014, the only one a 30 s pg_sleep can end
        # in after 0.5 s) exactly when the transaction around it is aborted, which the next
        # statement's 25P02 shows; and the connection is free at once, not after the 30 s.
        tx = conn.transaction()
        await tx.start()
        task = asyncio.create_task(conn.fetchval(SLEEP_SQL))
        watcher = await asyncpg_connect(a)
        await until_sleeping(lambda: watcher.fetchval(SLEEPERS_SQL))
        await watcher.close()
        t0 = await cancel_task(task)
        if t0 is None:
            return {"error": "pg_sleep was not cancelled"}
        try:
            await conn.fetchval("select 1")
            return {"error": "pg_sleep ended without an error"}
        except asyncpg.InFailedSQLTransactionError:
            sqlstate = "57014"
        took = time.monotonic() - t0
        await tx.rollback()
        after = await conn.fetchval("select 1")
        return {"sqlstate": sqlstate, "seconds": round(took, 2), "after": after}

    await run_async([connect, param, large, prepared, rollback, cancel])
    await conn.close()


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("driver", choices=["psycopg-sync", "psycopg-async", "asyncpg", "sqlalchemy"])
    ap.add_argument("phase", choices=["main", "wake"])
    for arg in ("host", "port", "user", "password", "database", "ca"):
        ap.add_argument(arg)
    # "--" first: a generated password may begin with "-", which argparse would take for an option.
    return ap.parse_args(["--", *argv])


def main() -> None:
    a = parse(sys.argv[1:])
    if a.driver == "psycopg-sync":
        psycopg_sync(a)
    elif a.driver == "psycopg-async":
        asyncio.run(psycopg_async(a))
    elif a.driver == "asyncpg":
        asyncio.run(asyncpg_driver(a))
    else:
        from tests.clients.sqlalchemy_app import sqlalchemy_driver

        asyncio.run(sqlalchemy_driver(a))


if __name__ == "__main__":
    main()
