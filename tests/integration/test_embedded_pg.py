"""Integration tests for libs.embedded_pg: a real PostgreSQL started, restarted, adopted and stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from libs.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _query(dsn: str, *statements: str) -> list[list[asyncpg.Record]]:
    async def run() -> list[list[asyncpg.Record]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [await conn.fetch(s) for s in statements]
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "pgdata", port=_free_port(), settings=FAST)
    try:
        yield server
    finally:
        server.destroy()  # as root the cluster may live under /var/lib/ctrlmesh-pg: don't leak it


def test_start_query_restart_reuse_stop(pg: EmbeddedPostgres) -> None:
    pg.start()
    pid = pg.pid
    assert pid is not None and pg.is_running()
    assert os.getsid(pid) == pid, "postgres must run in its own session (immune to terminal Ctrl-C)"
    assert pg.url.startswith(f"postgresql+asyncpg://ctrlmesh:{pg.password}@127.0.0.1:{pg.port}/postgres")
    assert pg.dsn.startswith("postgresql://")
    assert (pg.cluster_dir / ".pgpass-ctrlmesh").stat().st_mode & 0o777 == 0o600
    assert (pg.cluster_dir / "postgres.log").exists()
    if os.geteuid() == 0:
        assert Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0] != "0"

    one, _, _, rows = _query(
        pg.dsn,
        "select 1 as x",
        "create table t (id int primary key, name text)",
        "insert into t values (1, 'persisted')",
        "select id, name from t",
    )
    assert one[0]["x"] == 1
    assert [tuple(r) for r in rows] == [(1, "persisted")]

    pg.stop()
    assert _gone(pid) and _group_gone(pid)
    assert not pg.is_running()
    assert not (pg.cluster_dir / "postmaster.pid").exists()

    # Warm restart: same password from the 0600 file, same data.
    again = EmbeddedPostgres(pg.data_dir, port=pg.port, settings=FAST)
    again.start()
    assert again.password == pg.password
    assert [tuple(r) for r in _query(again.dsn, "select id, name from t")[0]] == [(1, "persisted")]

    # Second start while running adopts the live postmaster instead of spawning another.
    other = EmbeddedPostgres(pg.data_dir, port=pg.port, settings=FAST)
    t0 = time.monotonic()
    other.start()
    assert other.pid == again.pid
    assert time.monotonic() - t0 < 5
    again.start()  # idempotent on the owning instance too
    assert again.pid == other.pid

    # Adopted server on another port is an error, not a second postmaster.
    with pytest.raises(EmbeddedPostgresError, match="already served"):
        EmbeddedPostgres(pg.data_dir, port=_free_port()).start()

    running_pid = again.pid
    assert running_pid is not None
    again.stop()
    assert _gone(running_pid) and _group_gone(running_pid)
    assert not other.is_running()


def test_stale_pid_file_after_crash(pg: EmbeddedPostgres) -> None:
    pg.start()
    pid = pg.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)  # simulate a crash: postmaster.pid stays behind
    deadline = time.monotonic() + 10
    while not (_gone(pid) and _group_gone(pid)) and time.monotonic() < deadline:
        pg.is_running()  # reaps our child
        time.sleep(0.05)
    assert (pg.cluster_dir / "postmaster.pid").exists()

    fresh = EmbeddedPostgres(pg.data_dir, port=pg.port, settings=FAST)
    fresh.start()
    assert fresh.pid != pid
    assert _query(fresh.dsn, "select 1 as x")[0][0]["x"] == 1
    fresh.stop()


def test_context_manager_and_databases(pg: EmbeddedPostgres) -> None:
    with pg:
        pid = pg.pid
        assert pid is not None
        pg.create_database("scratch")
        assert _query(pg.dsn_for("scratch"), "select current_database() as d")[0][0]["d"] == "scratch"
        pg.drop_database("scratch")
        pg.drop_database("scratch")  # idempotent
    assert _gone(pid)


def test_startup_failure_reports_log_tail(tmp_path: Path) -> None:
    port = _free_port()
    bad = EmbeddedPostgres(tmp_path / "bad", port=port, settings={"no_such_setting": "1"}, startup_timeout=20)
    try:
        with pytest.raises(EmbeddedPostgresError, match="no_such_setting"):
            bad.start()
        assert not bad.is_running()
    finally:
        bad.destroy()
