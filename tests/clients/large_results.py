"""Large results and COPY TO through the PG Gateway with psycopg, sync and async, on whichever
libpq PSYCOPG_IMPL selects (`python` loads the system's libpq, `binary` the wheel's).

    python -m tests.clients.large_results DSN [--copy-mb N]

Prints one line per check; exits 1 on the first one that does not finish within its bound (a
hang is a failure, never a stuck test).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

import psycopg

QUERY = "select repeat('y', %s::int) from generate_series(1, 3)"
SIZES = range(1000, 40001, 997)  # the reproduction of the hang: it stopped at n = 8,976
STEP_TIMEOUT = 10.0


def _bounded(label: str, fn: object, timeout: float = STEP_TIMEOUT) -> None:
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as exc:  # reported below; the thread must not die silently
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(timeout):
        print(f"HANG {label}", flush=True)
        sys.exit(1)
    if failure:
        print(f"FAIL {label}: {failure[0]!r}", flush=True)
        sys.exit(1)


def sync_checks(dsn: str, copy_mb: int) -> None:
    conn = psycopg.connect(dsn, autocommit=True)
    for n in SIZES:

        def step(n: int = n) -> None:
            rows = conn.execute(QUERY, (n,)).fetchall()
            assert len(rows) == 3 and all(len(r[0]) == n for r in rows)

        _bounded(f"sync n={n}", step)
    print(f"ok sync wide rows to n={SIZES[-1]}", flush=True)

    def copy_out() -> None:
        total = 0
        rows = copy_mb * 1024  # 1 KiB rows
        with (
            conn.cursor() as cur,
            cur.copy(f"copy (select repeat('c', 1023) from generate_series(1, {rows})) to stdout") as copy,
        ):
            for block in copy:
                total += len(block)
        assert total == rows * 1024, total

    _bounded(f"sync copy to {copy_mb} MB", copy_out, timeout=120)
    print(f"ok sync copy to stdout {copy_mb} MB", flush=True)
    conn.close()


async def async_checks(dsn: str, copy_mb: int) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    for n in SIZES:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                rows = await (await conn.execute(QUERY, (n,))).fetchall()
        except TimeoutError:
            print(f"HANG async n={n}", flush=True)
            sys.exit(1)
        assert len(rows) == 3 and all(len(r[0]) == n for r in rows)
    print(f"ok async wide rows to n={SIZES[-1]}", flush=True)
    total = 0
    rows = copy_mb * 1024
    try:
        async with asyncio.timeout(120):
            async with conn.cursor() as cur:
                sql = f"copy (select repeat('c', 1023) from generate_series(1, {rows})) to stdout"
                async with cur.copy(sql) as copy:
                    async for block in copy:
                        total += len(block)
    except TimeoutError:
        print(f"HANG async copy to {copy_mb} MB", flush=True)
        sys.exit(1)
    assert total == rows * 1024, total
    print(f"ok async copy to stdout {copy_mb} MB", flush=True)
    await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dsn")
    ap.add_argument("--copy-mb", type=int, default=8)
    args = ap.parse_args()
    print(f"libpq {psycopg.pq.version()} ({psycopg.pq.__impl__})", flush=True)
    sync_checks(args.dsn, args.copy_mb)
    asyncio.run(async_checks(args.dsn, args.copy_mb))


if __name__ == "__main__":
    main()
