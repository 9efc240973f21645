"""Serverless PostgreSQL end to end: the REST API, the real PG Gateway, the databases service
and its computes, with real clients (psql, pgbench, psycopg 3, asyncpg) over TLS."""

import asyncio
import os
import signal
import ssl
import subprocess
import time

import asyncpg
import psycopg
import pytest

from tests.fixtures.databases import tenant_with_db

pytestmark = pytest.mark.e2e

PG_BIN = "/usr/lib/postgresql/15/bin"


@pytest.fixture(scope="module")
def pgmesh(idle_mesh):
    """The shared mesh whose databases stop after 2 s without a connection (test_pg_drivers.py
    uses it too, so the suite starts one such mesh, not two)."""
    return idle_mesh


def _dsn(mesh, t, **params: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in {"sslmode": "require", **params}.items())
    return f"postgresql://{t.pg_user}:{t.pg_password}@localhost:{mesh.env['CTRLMESH_PG_PORT']}/app?{q}"


def _ca(mesh) -> str:
    return str(mesh.data_dir / "pggateway" / "ca.crt")


def _state(mesh, t) -> str:
    return mesh.admin().get(f"/v2/tenants/{t.tenant}/dbs/app").json()["state"]


def _wait_state(mesh, t, state: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _state(mesh, t) != state:
        assert time.monotonic() < deadline, f"database never became {state}"
        time.sleep(0.1)


def _psql(dsn: str, sql: str) -> str:
    out = subprocess.run(
        [f"{PG_BIN}/psql", dsn, "-XAtq", "-c", sql], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_stop_wake_cycle_with_every_client(pgmesh):
    """psql (verify-full), psycopg and asyncpg wake a stopped database; it stops when idle and
    wakes again with the data intact; pgbench runs through the Gateway."""
    t = tenant_with_db(pgmesh)
    assert _state(pgmesh, t) == "stopped"
    verify = _dsn(pgmesh, t, sslmode="verify-full", sslrootcert=_ca(pgmesh))
    assert (
        _psql(
            verify,
            "create table kv (k int primary key, v text); insert into kv values (1, 'one'); select v from kv",
        )
        == "one"
    )
    assert _state(pgmesh, t) == "ready"
    _wait_state(pgmesh, t, "stopped")
    with psycopg.connect(_dsn(pgmesh, t), prepare_threshold=None) as conn:
        assert conn.execute("select v from kv where k = 1").fetchone() == ("one",)
        conn.execute("insert into kv values (2, 'two')")
        conn.commit()
    _wait_state(pgmesh, t, "stopped")

    async def with_asyncpg() -> list:
        ctx = ssl.create_default_context(cafile=_ca(pgmesh))
        conn = await asyncpg.connect(_dsn(pgmesh, t).split("?")[0], ssl=ctx, statement_cache_size=0)
        try:
            return [tuple(r) for r in await conn.fetch("select k, v from kv order by k")]
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg()) == [(1, "one"), (2, "two")]
    env = {**os.environ, "PGPASSWORD": t.pg_password, "PGSSLMODE": "require"}
    base = ["-h", "localhost", "-p", pgmesh.env["CTRLMESH_PG_PORT"], "-U", t.pg_user]
    init = subprocess.run(
        [f"{PG_BIN}/pgbench", "-i", "-s", "1", "-q", *base, "app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    run = subprocess.run(
        [f"{PG_BIN}/pgbench", "-n", "-S", "-c", "4", "-T", "2", *base, "app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0 and "tps" in run.stdout, run.stderr


def test_wrong_password_and_unknown_database_through_the_mesh(pgmesh):
    """A wrong password is 28P01; a database the tenant lacks is 3D000; a rotated password takes over."""
    t = tenant_with_db(pgmesh)
    bad = _dsn(pgmesh, t).replace(t.pg_password, "nope")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad)
    with pytest.raises(psycopg.OperationalError, match='database "other" does not exist'):
        psycopg.connect(_dsn(pgmesh, t).replace("/app?", "/other?"))
    new = pgmesh.admin().post(f"/v2/tenants/{t.tenant}/credentials/rotate").json()["pg_password"]
    time.sleep(2.5)  # the Gateway caches looked-up credentials for 2 s
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(_dsn(pgmesh, t))
    with psycopg.connect(_dsn(pgmesh, t).replace(t.pg_password, new)) as conn:
        assert conn.execute("select current_user").fetchone() == (t.pg_user,)


def test_acknowledged_commits_survive_a_sigkill_of_the_compute_under_load(pgmesh):
    """Writers commit through the Gateway; the compute gets SIGKILL mid-load; after the next
    connection wakes it again, every acknowledged key is there."""
    t = tenant_with_db(pgmesh)
    with psycopg.connect(_dsn(pgmesh, t), autocommit=True) as conn:
        conn.execute("create table acked (k text primary key)")
    acked: list[str] = []

    async def writer(w: int, stop: asyncio.Event) -> None:
        ctx = ssl.create_default_context(cafile=_ca(pgmesh))
        i = 0
        while not stop.is_set():
            try:
                conn = await asyncpg.connect(
                    _dsn(pgmesh, t).split("?")[0], ssl=ctx, statement_cache_size=0, timeout=10
                )
            except Exception:  # the compute is down or waking: try again shortly
                await asyncio.sleep(0.05)
                continue
            try:
                while not stop.is_set():
                    key = f"w{w}-{i}"
                    await conn.execute("insert into acked values ($1)", key)
                    acked.append(key)  # only after the server acknowledged the commit
                    i += 1
            except Exception:  # any failure of the connection (asyncpg has several error roots)
                i += 1  # the in-flight key may or may not have committed; never count it
            finally:
                conn.terminate()

    async def run() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(writer(w, stop)) for w in range(6)]
        await asyncio.sleep(1.5)
        pid = int((pgmesh.data_dir / "computes" / t.db_id / "postmaster.pid").read_text().split()[0])
        before = len(acked)
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(3.0)  # writers hit the crash, reconnect, wake a new compute, go on
        stop.set()
        await asyncio.gather(*tasks)
        assert before > 50 and len(acked) > before  # load before the kill, and writes after it

    asyncio.run(run())
    with psycopg.connect(_dsn(pgmesh, t)) as conn:
        present = {r[0] for r in conn.execute("select k from acked")}
    missing = [k for k in acked if k not in present]
    assert missing == [], f"{len(missing)} acknowledged commits lost"
