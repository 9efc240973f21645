"""Large results at full size through the PG Gateway: sweeps of 3, 5 and 1,000-row results from
1 B per row up to 16 MiB in all (each on a fresh connection, where the 16 KiB-record hang showed),
one wide value from 1 B to 64 MiB (around the 8 KiB and 16 KiB TLS-record sizes, then up), 64 MiB
in 64 Ki rows, COPY TO of 100 MiB, and COPY FROM of a 64 MiB table, with one driver per run:

    python -m tests.clients.large_results_full DRIVER DSN CA_PEM

DRIVER is psycopg-sync or psycopg-async (non-blocking libpq; PSYCOPG_IMPL=python picks Debian's
libpq 15, the one that hung) or asyncpg. Prints one line per check, "ok CHECK SECONDS" or
"FAIL/HANG CHECK ..."; exits 1 on the first failure. Every check is bounded by a timeout, so a hang
is a failure, never a stuck test.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

MIB = 1 << 20
WIDE = [1, 8191, 8192, 8193, 16383, 16384, 16385, 65536, MIB, 16 * MIB, 64 * MIB]
# Results of R rows of n bytes, n growing by 30 % up to 16 MiB in all: where a response ends
# relative to the TLS records decides whether non-blocking libpq 15 hangs (with 16 KiB records it
# did at 3 x 9,727, 5 x 5,756 and 1,000 x 4,427; one wide value never did).
SWEEP_ROWS = (3, 5, 1000)
SWEEP_TOTAL = 16 * MIB
SWEEP_TIMEOUT = 10.0
ROW = 1024  # bytes per row in the many-rows, COPY TO and COPY FROM checks (with COPY's newline)
MANY_ROWS = 64 * MIB // ROW
COPY_TO_ROWS = 100 * MIB // ROW
COPY_FROM_ROWS = 64 * MIB // ROW
TIMEOUT = 30.0

WIDE_SQL = "select repeat('w', {n}::int)"
SWEEP_SQL = "select repeat('s', {n}::int) from generate_series(1, {rows}::int)"
MANY_SQL = f"select repeat('m', {ROW}) from generate_series(1, {MANY_ROWS})"
COPY_TO_SQL = f"copy (select repeat('c', {ROW - 1}) from generate_series(1, {COPY_TO_ROWS})) to stdout"
COPY_FROM_CHECK = "select count(*), sum(length(v)) from big"


def sweep(rows: int) -> list[int]:
    sizes, n = [], 1.0
    while int(n) * rows <= SWEEP_TOTAL:
        sizes.append(int(n))
        n *= 1.3
    return sizes


def copy_from_blocks() -> Iterator[bytes]:
    """COPY text rows "<id>\\t<filler>\\n" of exactly ROW bytes, in blocks of 1,000 rows."""
    for start in range(0, COPY_FROM_ROWS, 1000):
        rows = []
        for i in range(start, min(start + 1000, COPY_FROM_ROWS)):
            head = f"{i}\t"
            rows.append(head + "f" * (ROW - len(head) - 1) + "\n")
        yield "".join(rows).encode()


def report(label: str, t0: float) -> None:
    print(f"ok {label} {time.monotonic() - t0:.2f}", flush=True)


def fail(kind: str, label: str, detail: str = "") -> None:
    print(f"{kind} {label} {detail}".rstrip(), flush=True)
    sys.exit(1)


def bounded_sync(label: str, fn: Callable[[], None], timeout: float = TIMEOUT, quiet: bool = False) -> None:
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # reported below; the thread must not die silently
            failure.append(exc)

    t0 = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        fail("HANG", label, f"after {timeout:.0f} s")
    if failure:
        fail("FAIL", label, repr(failure[0]))
    if not quiet:
        report(label, t0)


async def bounded_async(
    label: str, coro: Awaitable[Any], limit: float = TIMEOUT, quiet: bool = False
) -> None:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            await coro
    except TimeoutError:
        fail("HANG", label, f"after {limit:.0f} s")
    except Exception as exc:  # reported as this check's failure
        fail("FAIL", label, repr(exc))
    if not quiet:
        report(label, t0)


def psycopg_sync(dsn: str) -> None:
    import psycopg

    conn = psycopg.connect(dsn, autocommit=True)
    print(f"libpq {psycopg.pq.version()} ({psycopg.pq.__impl__})", flush=True)
    for rows in SWEEP_ROWS:
        # A fresh connection each: libpq's input buffer only grows, and a large one hides the hang.
        conn.close()
        conn = psycopg.connect(dsn, autocommit=True)
        t0 = time.monotonic()
        for n in sweep(rows):

            def step(n: int = n, rows: int = rows, conn: psycopg.Connection[Any] = conn) -> None:
                got = conn.execute(SWEEP_SQL.format(n="%s", rows="%s"), (n, rows)).fetchall()
                assert len(got) == rows and all(len(r[0]) == n for r in got)

            bounded_sync(f"sweep {rows} x {n}", step, SWEEP_TIMEOUT, quiet=True)
        report(f"sweep {rows} rows", t0)
    for n in WIDE:

        def wide(n: int = n) -> None:
            row = conn.execute(WIDE_SQL.format(n="%s"), (n,)).fetchone()
            assert row is not None and len(row[0]) == n

        bounded_sync(f"wide {n}", wide)

    def many() -> None:
        rows = conn.execute(MANY_SQL).fetchall()
        assert len(rows) == MANY_ROWS and sum(len(r[0]) for r in rows) == MANY_ROWS * ROW

    bounded_sync(f"rows {MANY_ROWS}x{ROW}", many)

    def copy_to() -> None:
        total = 0
        with conn.cursor() as cur, cur.copy(COPY_TO_SQL) as copy:
            for block in copy:
                total += len(block)
        assert total == COPY_TO_ROWS * ROW, total

    bounded_sync("copy to 100 MiB", copy_to)

    def copy_from() -> None:
        conn.execute("drop table if exists big")
        conn.execute("create table big (id int, v text)")
        with conn.cursor() as cur, cur.copy("copy big from stdin") as copy:
            for block in copy_from_blocks():
                copy.write(block)
        row = conn.execute(COPY_FROM_CHECK).fetchone()
        assert row is not None and row[0] == COPY_FROM_ROWS, row
        conn.execute("drop table big")

    bounded_sync("copy from 64 MiB", copy_from)
    conn.close()


async def psycopg_async(dsn: str) -> None:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    print(f"libpq {psycopg.pq.version()} ({psycopg.pq.__impl__})", flush=True)

    async def one(sql: str, params: Any = None) -> Any:
        return await (await conn.execute(sql, params)).fetchone()

    for rows in SWEEP_ROWS:
        # A fresh connection each: libpq's input buffer only grows, and a large one hides the hang.
        await conn.close()
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        t0 = time.monotonic()
        for n in sweep(rows):

            async def step(n: int = n, rows: int = rows, conn: psycopg.AsyncConnection[Any] = conn) -> None:
                cur = await conn.execute(SWEEP_SQL.format(n="%s", rows="%s"), (n, rows))
                got = await cur.fetchall()
                assert len(got) == rows and all(len(r[0]) == n for r in got)

            await bounded_async(f"sweep {rows} x {n}", step(), SWEEP_TIMEOUT, quiet=True)
        report(f"sweep {rows} rows", t0)
    for n in WIDE:

        async def wide(n: int = n) -> None:
            row = await one(WIDE_SQL.format(n="%s"), (n,))
            assert row is not None and len(row[0]) == n

        await bounded_async(f"wide {n}", wide())

    async def many() -> None:
        rows = await (await conn.execute(MANY_SQL)).fetchall()
        assert len(rows) == MANY_ROWS and sum(len(r[0]) for r in rows) == MANY_ROWS * ROW

    await bounded_async(f"rows {MANY_ROWS}x{ROW}", many())

    async def copy_to() -> None:
        total = 0
        async with conn.cursor() as cur, cur.copy(COPY_TO_SQL) as copy:
            async for block in copy:
                total += len(block)
        assert total == COPY_TO_ROWS * ROW, total

    await bounded_async("copy to 100 MiB", copy_to())

    async def copy_from() -> None:
        await conn.execute("drop table if exists big")
        await conn.execute("create table big (id int, v text)")
        async with conn.cursor() as cur, cur.copy("copy big from stdin") as copy:
            for block in copy_from_blocks():
                await copy.write(block)
        row = await one(COPY_FROM_CHECK)
        assert row is not None and row[0] == COPY_FROM_ROWS, row
        await conn.execute("drop table big")

    await bounded_async("copy from 64 MiB", copy_from())
    await conn.close()


async def asyncpg_driver(dsn: str, ca: str) -> None:
    import asyncpg

    u = urlsplit(dsn)
    conn = await asyncpg.connect(
        host=u.hostname,
        port=u.port,
        user=u.username,
        password=u.password,
        database=u.path.lstrip("/"),
        ssl=ssl.create_default_context(cafile=ca),
        timeout=20,
    )
    for rows in SWEEP_ROWS:
        t0 = time.monotonic()
        for n in sweep(rows):

            async def step(n: int = n, rows: int = rows) -> None:
                got = await conn.fetch(SWEEP_SQL.format(n="$1", rows="$2"), n, rows)
                assert len(got) == rows and all(len(r[0]) == n for r in got)

            await bounded_async(f"sweep {rows} x {n}", step(), SWEEP_TIMEOUT, quiet=True)
        report(f"sweep {rows} rows", t0)
    for n in WIDE:

        async def wide(n: int = n) -> None:
            assert len(await conn.fetchval(WIDE_SQL.format(n="$1"), n)) == n

        await bounded_async(f"wide {n}", wide())

    async def many() -> None:
        rows = await conn.fetch(MANY_SQL)
        assert len(rows) == MANY_ROWS and sum(len(r[0]) for r in rows) == MANY_ROWS * ROW

    await bounded_async(f"rows {MANY_ROWS}x{ROW}", many())

    async def copy_to() -> None:
        total = 0

        async def sink(chunk: bytes) -> None:
            nonlocal total
            total += len(chunk)

        query = COPY_TO_SQL.removeprefix("copy (").removesuffix(") to stdout")
        await conn.copy_from_query(query, output=sink)
        assert total == COPY_TO_ROWS * ROW, total

    await bounded_async("copy to 100 MiB", copy_to())

    async def copy_from() -> None:
        await conn.execute("drop table if exists big")
        await conn.execute("create table big (id int, v text)")

        async def source() -> Any:
            for block in copy_from_blocks():
                yield block

        await conn.copy_to_table("big", source=source())
        row = await conn.fetchrow(COPY_FROM_CHECK)
        assert row[0] == COPY_FROM_ROWS, row
        await conn.execute("drop table big")

    await bounded_async("copy from 64 MiB", copy_from())
    await conn.close()


def main() -> None:
    driver, dsn, ca = sys.argv[1:4]
    if driver == "psycopg-sync":
        psycopg_sync(dsn)
    elif driver == "psycopg-async":
        asyncio.run(psycopg_async(dsn))
    elif driver == "asyncpg":
        asyncio.run(asyncpg_driver(dsn, ca))
    else:
        fail("FAIL", "driver", f"unknown driver {driver!r}")
    print("done", flush=True)


if __name__ == "__main__":
    main()
