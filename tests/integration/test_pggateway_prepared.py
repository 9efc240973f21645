"""Named prepared statements through the PG Gateway's transaction pooling, against a real
PostgreSQL compute and real drivers (asyncpg's statement cache, psycopg's automatic preparation
and libpq's own Parse/Close), all over TLS.

The gateway keeps each client's statements and prepares them on whichever backend serves the
next transaction (pggateway/prepared.py): no session pins, and a statement a client prepared on
one backend runs on another.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pggateway.controlplane import Credentials
from pggateway.scram import Verifier
from pggateway.tls import ensure_material
from tests.integration.test_pggateway import (
    PASSWORD,
    TENANT_ID,
    USER,
    FakeControlPlane,
    FakeDatabase,
    GatewayThread,
    _make_compute,
    _pg_tool,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Stand:
    def __init__(self, root: Path) -> None:
        verifier = Verifier.from_password(PASSWORD).text()
        self.compute = _make_compute(root / "compute", verifier, ["app"])
        self.cp = FakeControlPlane()
        self.cp.users[USER] = Credentials(TENANT_ID, "alpha", USER, verifier, "active", PASSWORD)
        self.cp.databases[(TENANT_ID, "app")] = FakeDatabase(self.compute, "app")
        self.tls = ensure_material(root / "data", "pg.example.test")
        self.gateways: list[GatewayThread] = []

    def gateway(self, **overrides: Any) -> GatewayThread:
        opts: dict[str, Any] = {
            "pool_size": 2,
            "checkout_timeout": 10.0,
            "lease_ttl": 1.5,
            "release_grace": 0.3,
        }
        gw = GatewayThread(self.cp, self.tls, **{**opts, **overrides})
        self.gateways.append(gw)
        return gw

    @staticmethod
    def dsn(gw: GatewayThread) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{gw.port}/app?sslmode=require"

    def direct_dsn(self) -> str:
        return self.compute.dsn_for("app")

    def close(self) -> None:
        for gw in self.gateways:
            gw.stop()
        self.compute.destroy()


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    s = Stand(tmp_path_factory.mktemp("pggw-prepared"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def gw(stand: Stand) -> GatewayThread:
    return stand.gateway()


def test_asyncpg_statement_cache_moves_between_backends_without_pinning(
    stand: Stand, gw: GatewayThread
) -> None:
    """asyncpg's statement cache (named statements) keeps pooling: a statement prepared on one
    backend runs on the other once the first is busy (an injected Parse), results stay right,
    and no session is ever pinned."""
    dsn = stand.dsn(gw)

    async def run() -> None:
        a = await asyncpg.connect(dsn)
        b = await asyncpg.connect(dsn)
        try:
            query = "select $1::int * 2, pg_backend_pid()"
            v, pid1 = await a.fetchrow(query, 21)
            assert v == 42
            injected = gw.metric("pggateway_prepared_injected_parses_total")
            # b holds the backend a just used (the pool hands out the warmest first) ...
            async with b.transaction():
                assert await b.fetchval("select pg_backend_pid()") == pid1
                # ... so a's cached statement has to run on the other backend.
                v, pid2 = await a.fetchrow(query, 5)
            assert (v, pid2 != pid1) == (10, True)
            assert gw.metric("pggateway_prepared_injected_parses_total") == injected + 1
            for i in range(10):
                assert (await a.fetchrow(query, i))[0] == 2 * i
                assert await b.fetchval("select $1::text || 'x'", str(i)) == f"{i}x"
            assert gw.metric("pggateway_pinned_sessions") == 0
        finally:
            await a.close()
            await b.close()

    pins = gw.metric("pggateway_pins_total", reason="named_statement")
    asyncio.run(run())
    assert gw.metric("pggateway_pins_total", reason="named_statement") == pins


def test_many_asyncpg_and_psycopg_clients_share_a_small_pool(stand: Stand, gw: GatewayThread) -> None:
    """Eight asyncpg connections (default statement cache) and four psycopg ones
    (prepare_threshold 0 and the default 5, with rollbacks, which make psycopg send DEALLOCATE
    ALL) run many transactions over two backends: every result is right, nothing pins, each
    client's statements ran on both backends, and identical statements were shared."""
    dsn = stand.dsn(gw)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table if not exists ledger (client int, n int, primary key (client, n))")
        conn.execute("truncate ledger")
    hits = gw.metric("pggateway_prepared_shared_hits_total")
    errors: list[BaseException] = []
    pids: dict[str, set[int]] = {}
    stop_pinned_watch = threading.Event()
    pinned_seen = [0.0]

    async def asyncpg_client(i: int) -> None:
        conn = await asyncpg.connect(dsn)
        seen = pids.setdefault(f"asyncpg{i}", set())
        try:
            for n in range(25):
                async with conn.transaction():
                    await conn.execute("insert into ledger values ($1, $2)", i, n)
                    total, pid = await conn.fetchrow(
                        "select sum(n), pg_backend_pid() from ledger where client = $1", i
                    )
                    assert total == n * (n + 1) // 2
                    seen.add(pid)
                assert await conn.fetchval("select $1::int + $2::int", n, i) == n + i
        finally:
            await conn.close()

    async def asyncpg_all() -> None:
        await asyncio.gather(*(asyncpg_client(i) for i in range(8)))

    def psycopg_client(i: int, threshold: int) -> None:
        try:
            with psycopg.connect(dsn, prepare_threshold=threshold) as conn:
                seen = pids.setdefault(f"psycopg{i}", set())
                for n in range(25):
                    conn.execute("insert into ledger values (%s, %s)", (100 + i, n))
                    row = conn.execute(
                        "select count(*), pg_backend_pid() from ledger where client = %s", (100 + i,)
                    )
                    count, pid = row.fetchone()  # type: ignore[misc]
                    assert count == n + 1
                    seen.add(pid)
                    conn.commit()
                    if n % 5 == 4:
                        conn.execute("select %s::int", (n,))
                        conn.rollback()
                    assert conn.execute("select %s::int * 3", (n,)).fetchone() == (3 * n,)
                    conn.commit()
        except BaseException as exc:
            errors.append(exc)

    def asyncpg_thread() -> None:
        try:
            asyncio.run(asyncpg_all())
        except BaseException as exc:
            errors.append(exc)

    def watch() -> None:
        while not stop_pinned_watch.wait(0.01):
            pinned_seen[0] = max(pinned_seen[0], gw.metric("pggateway_pinned_sessions"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=asyncpg_thread)]
    threads += [threading.Thread(target=psycopg_client, args=(i, i % 2 * 5)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    stop_pinned_watch.set()
    watcher.join(5)
    assert not errors, errors
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select count(*), count(distinct client) from ledger").fetchone() == (300, 12)
    assert pinned_seen[0] == 0
    # Twelve clients, two backends: every client's prepared statements ran on both.
    assert all(len(s) == 2 for s in pids.values()), pids
    assert gw.metric("pggateway_prepared_shared_hits_total") > hits
    assert gw.metric("pggateway_prepared_statements_max_per_backend") <= 200


def test_lru_eviction_closes_statements_and_evicted_ones_still_work(stand: Stand) -> None:
    """With at most two statements per backend, a client cycling through five keeps getting
    right answers: evicted statements are Closed on the backend (it never holds more than two
    of ours) and prepared again when used."""
    gw = stand.gateway(pool_size=1, max_prepared_statements=2)

    async def run() -> None:
        conn = await asyncpg.connect(stand.dsn(gw))
        try:
            stmts = [await conn.prepare(f"select $1::int + {k}") for k in range(5)]
            for rnd in range(3):
                for k, stmt in enumerate(stmts):
                    assert await stmt.fetchval(rnd) == rnd + k
                    held = await conn.fetchval(
                        "select count(*) from pg_prepared_statements where name like 'cm\\_%'"
                    )
                    # This lookup is itself an asyncpg statement; the bound counts it too.
                    assert held <= 2
        finally:
            await conn.close()

    asyncio.run(run())
    assert gw.metric("pggateway_prepared_evictions_total") >= 10
    assert gw.metric("pggateway_prepared_statements_max_per_backend") <= 2


@pytest.mark.parametrize("target", ["direct", "gateway"])
def test_libpq_parse_close_describe_and_deallocate_as_directly(
    stand: Stand, gw: GatewayThread, target: str
) -> None:
    """libpq's own Parse/Close/Describe and DEALLOCATE / DISCARD ALL give the same answers through
    the gateway as directly: a name closed and prepared again runs the new SQL, a duplicate is
    42P05, a closed name 26000; DEALLOCATE and DISCARD ALL forget only that client's statements;
    the unnamed statement bound in a later transaction than its Parse works on another backend."""
    dsn = stand.direct_dsn() if target == "direct" else stand.dsn(gw)
    r = subprocess.run(
        [sys.executable, "-m", "tests.clients.named_statements", dsn],
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for check in ("close and re-parse", "deallocate", "unnamed across transactions"):
        assert f"ok {check}" in r.stdout, r.stdout
    if target == "gateway":
        assert gw.metric("pggateway_pinned_sessions") == 0


def test_an_error_in_a_batch_then_reuse(stand: Stand, gw: GatewayThread) -> None:
    """Division by zero in Execute of a prepared statement, and a pipeline whose first statement
    fails (so the server skips the rest, injected Parses included), leave every statement
    usable; the errors are the server's own."""

    async def run() -> None:
        conn = await asyncpg.connect(stand.dsn(gw))
        try:
            stmt = await conn.prepare("select 10 / $1::int")
            with pytest.raises(asyncpg.DivisionByZeroError):
                await stmt.fetchval(0)
            assert await stmt.fetchval(2) == 5
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval("select 10 / $1::int", 0)
            assert await conn.fetchval("select 10 / $1::int", 5) == 2
        finally:
            await conn.close()

    asyncio.run(run())

    with psycopg.connect(stand.dsn(gw), autocommit=True, prepare_threshold=0) as conn:
        for i in range(1, 4):  # prepared, on whichever backend
            assert conn.execute("select 100 / %s::int", (i,)).fetchone() == (100 // i,)
            assert conn.execute("select %s::int - 1", (i,)).fetchone() == (i - 1,)
        holder = psycopg.connect(stand.dsn(gw))
        try:
            holder.execute("select 1")  # busy: the next pipeline runs on the other backend
            with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
                conn.execute("select 100 / %s::int", (0,))
                conn.execute("select %s::int - 1", (7,))  # skipped by the server
        finally:
            holder.close()
        for i in range(1, 4):
            assert conn.execute("select %s::int - 1", (i,)).fetchone() == (i - 1,)
            assert conn.execute("select 100 / %s::int", (i,)).fetchone() == (100 // i,)


def test_schema_change_is_reported_like_direct_postgresql(stand: Stand, gw: GatewayThread) -> None:
    """After a column is added, a statement prepared before gets 0A000 "cached plan must not
    change result type" through the gateway exactly as directly; asyncpg's automatic re-prepare
    then works through the gateway as it does directly."""
    with psycopg.connect(stand.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists shape")
        admin.execute("create table shape (a int)")
        admin.execute("insert into shape values (1)")
        admin.execute(f"grant all on shape to {USER}")

    def psycopg_errors(dsn: str) -> str:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            assert conn.execute("select * from shape").fetchall() == [(1,)]
            with psycopg.connect(stand.direct_dsn(), autocommit=True) as admin:
                admin.execute("alter table shape add column b int default 0")
            try:
                with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
                    conn.execute("select * from shape")
                return f"{info.value.sqlstate} {info.value.diag.message_primary}"
            finally:
                with psycopg.connect(stand.direct_dsn(), autocommit=True) as admin:
                    admin.execute("alter table shape drop column b")

    direct = psycopg_errors(stand.direct_dsn())
    through = psycopg_errors(stand.dsn(gw))
    assert direct == through == "0A000 cached plan must not change result type"

    async def asyncpg_rows(dsn: str) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(dsn)
        try:
            assert [tuple(r) for r in await conn.fetch("select * from shape")] == [(1,)]
            with psycopg.connect(stand.direct_dsn(), autocommit=True) as admin:
                admin.execute("alter table shape add column c int default 7")
            try:
                return [tuple(r) for r in await conn.fetch("select * from shape")]
            finally:
                with psycopg.connect(stand.direct_dsn(), autocommit=True) as admin:
                    admin.execute("alter table shape drop column c")
        finally:
            await conn.close()

    assert asyncio.run(asyncpg_rows(stand.direct_dsn())) == [(1, 7)]
    assert asyncio.run(asyncpg_rows(stand.dsn(gw))) == [(1, 7)]


def test_pgbench_prepared_mode_runs_pooled(stand: Stand, gw: GatewayThread) -> None:
    """pgbench -M prepared (select-only and TPC-B, six clients over two backends) runs through
    the gateway with no failed transaction and no pinned session; the six clients' identical
    statements are shared on the backends."""
    base = {**os.environ, "PGPASSWORD": PASSWORD, "PGUSER": USER}
    init = subprocess.run(
        [_pg_tool("pgbench"), "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(stand.compute.port), "app"],
        env={**base, "PGSSLMODE": "disable"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    hits = gw.metric("pggateway_prepared_shared_hits_total")
    target = ["-h", "127.0.0.1", "-p", str(gw.port), "app"]
    # One thread per client: pgbench prepares with a blocking PQprepare on a client's first run
    # of a statement, which would stall its thread's other clients while they hold backends.
    for script in (["-S"], []):
        run = subprocess.run(
            [_pg_tool("pgbench"), "-n", *script, "-M", "prepared", "-T", "1", "-c", "6", "-j", "6", *target],
            env={**base, "PGSSLMODE": "require"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "number of failed transactions: 0" in run.stdout, run.stdout
        assert float(run.stdout.split("tps = ")[1].split()[0]) > 10
    assert gw.metric("pggateway_pinned_sessions") == 0
    # 6 clients x 8 distinct statements, over 2 backends: most Parses find theirs there.
    assert gw.metric("pggateway_prepared_shared_hits_total") - hits >= 30
