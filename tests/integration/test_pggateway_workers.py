"""The multi-process PG Gateway: a supervisor and two workers sharing one port (SO_REUSEPORT),
in front of a real PostgreSQL compute, with real clients over TLS.

The gateway is `python -m pggateway.standalone --workers 2`: the production supervisor, workers,
listener and pools, with the four control-plane calls answered locally (one always-ready
database), so these tests need no accounts or databases service. The mesh end to end (leases per
worker, idle stop) is `tests/e2e/test_pg_gateway_mesh.py`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest

from libs.embedded_pg import EmbeddedPostgres
from pggateway import keys
from pggateway.scram import Verifier
from pggateway.standalone import PASSWORD_ENV
from tests.fixtures.mesh import ROOT, free_block, free_port
from tests.integration.test_pggateway import PASSWORD, USER, _make_compute

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

WORKERS = 2
# Small, so that a test can see each worker apply it (evictions).
MAX_PREPARED = 3


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    compute: EmbeddedPostgres

    def dsn(self) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/app?sslmode=require&connect_timeout=10"

    def worker_pids(self) -> list[int]:
        text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(p) for p in text.split()]

    def metric(self, worker: int, name: str, labels: str = "") -> float:
        url = f"http://127.0.0.1:{self.metrics_port + worker}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read().decode()
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name + (labels and "{")) and (not labels or labels in line):
                total += float(line.rsplit(" ", 1)[1])
        return total


def _env() -> dict[str, str]:
    return {**os.environ, PASSWORD_ENV: PASSWORD, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"}


def _metrics_up(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Whether a worker may still hold its sockets: until the supervisor has reaped it (a
    killed process's leader is a zombie while its other threads, and so its files, go)."""
    return Path(f"/proc/{pid}").exists()


def _wait_workers_up(gw: Gateway, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(_metrics_up(gw.metrics_port + i) for i in range(WORKERS)):
        assert gw.proc.poll() is None, "the supervisor exited"
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    # A worker opens its metrics port just before it binds the listener.
    while True:
        try:
            with psycopg.connect(gw.dsn()) as conn:
                conn.execute("select 1")
            return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the gateway does not answer"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("pggw-workers")
    compute = _make_compute(root / "compute", Verifier.from_password(PASSWORD).text(), ["app"])
    port, metrics = free_port(), free_block(WORKERS)
    cmd = [
        sys.executable,
        "-m",
        "pggateway.standalone",
        f"--port={port}",
        f"--compute-port={compute.port}",
        "--database=app",
        f"--user={USER}",
        f"--data-dir={root / 'gw'}",
        "--pool-size=4",
        f"--workers={WORKERS}",
        f"--metrics-port={metrics}",
        f"--max-prepared={MAX_PREPARED}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env())
    g = Gateway(proc, port, metrics, compute)
    try:
        _wait_workers_up(g)
        yield g
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        compute.destroy()


def _sessions_by_worker(gw: Gateway, n: int) -> dict[int, int]:
    seen: dict[int, int] = {}
    for _ in range(n):
        with psycopg.connect(gw.dsn(), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            worker = keys.key_worker(conn.info.backend_pid)
            assert worker is not None
            seen[worker] = seen.get(worker, 0) + 1
    return seen


def test_connections_spread_across_both_workers(gw: Gateway) -> None:
    """Two dozen connections to the one port are served by both workers: each session's id names
    its worker, and each worker's own metrics count the connections it accepted."""
    before = [gw.metric(i, "pggateway_client_connections_accepted_total") for i in range(WORKERS)]
    seen = _sessions_by_worker(gw, 24)
    assert set(seen) == {0, 1}, seen
    after = [gw.metric(i, "pggateway_client_connections_accepted_total") for i in range(WORKERS)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [seen[0], seen[1]]


def _connect_on(gw: Gateway, worker: int) -> psycopg.Connection:
    for _ in range(60):
        conn = psycopg.connect(gw.dsn(), autocommit=True)
        if keys.key_worker(conn.info.backend_pid) == worker:
            return conn
        conn.close()
    raise AssertionError(f"no connection landed on worker {worker}")


def test_cancel_works_whichever_worker_receives_it(gw: Gateway) -> None:
    """A cancel of a session on either worker stops its query, whether the kernel hands the
    CancelRequest to the owning worker or to the other one (which passes it on)."""
    for owner in range(WORKERS):
        other = 1 - owner
        passed_before = gw.metric(other, "pggateway_cancel_requests_total", 'outcome="passed_on"')
        with _connect_on(gw, owner) as conn:
            for _ in range(16):
                timer = threading.Timer(0.3, conn.cancel_safe)
                timer.start()
                t0 = time.monotonic()
                with pytest.raises(psycopg.errors.QueryCanceled):
                    conn.execute("select pg_sleep(10)")
                assert time.monotonic() - t0 < 5
                timer.join()
                assert conn.execute("select 1").fetchone() == (1,)
                if gw.metric(other, "pggateway_cancel_requests_total", 'outcome="passed_on"') > passed_before:
                    break
            else:
                raise AssertionError(f"no cancel for worker {owner} was received by worker {other}")


async def _asyncpg_on(gw: Gateway, worker: int) -> asyncpg.Connection:
    for _ in range(60):
        conn = await asyncpg.connect(gw.dsn().replace("&connect_timeout=10", ""), timeout=10)
        if keys.key_worker(conn.get_server_pid()) == worker:
            return conn
        await conn.close()
    raise AssertionError(f"no asyncpg connection landed on worker {worker}")


def test_prepared_statements_survive_pooling_on_both_workers(gw: Gateway) -> None:
    """asyncpg's statement cache through the 2-worker gateway: on each worker a cached statement
    runs on another backend than it was prepared on (an injected Parse), statements beyond the
    worker's --max-prepared are evicted and still run, every result is right, and neither worker
    pins a session."""
    pins = [gw.metric(i, "pggateway_pins_total", 'reason="named_statement"') for i in range(WORKERS)]

    async def on(worker: int, a: asyncpg.Connection, b: asyncpg.Connection) -> None:
        try:
            query = "select $1::int * 2, pg_backend_pid()"
            v, pid1 = await a.fetchrow(query, 21)
            assert v == 42
            injected = gw.metric(worker, "pggateway_prepared_injected_parses_total")
            # b takes the backend a just used (the warmest), so a's statement runs on the other.
            async with b.transaction():
                assert await b.fetchval("select pg_backend_pid()") == pid1
                v, pid2 = await a.fetchrow(query, 5)
            assert (v, pid2 != pid1) == (10, True)
            assert gw.metric(worker, "pggateway_prepared_injected_parses_total") > injected
            evictions = gw.metric(worker, "pggateway_prepared_evictions_total")
            for i in range(3 * MAX_PREPARED):
                for n in range(MAX_PREPARED + 2):  # more statements than a backend may keep
                    assert await a.fetchval(f"select $1::int + {n}", i) == i + n
                assert await b.fetchval("select $1::text || 'x'", str(i)) == f"{i}x"
            assert gw.metric(worker, "pggateway_prepared_evictions_total") > evictions
            assert gw.metric(worker, "pggateway_prepared_statements_max_per_backend") <= MAX_PREPARED
            assert gw.metric(worker, "pggateway_pinned_sessions") == 0
        finally:
            await a.close()
            await b.close()

    async def run() -> None:
        async with asyncio.timeout(60):
            # All connected first: a login takes a backend of the worker it lands on. Two per
            # worker, whose share of --pool-size=4 is two backends.
            pairs = [[await _asyncpg_on(gw, i) for _ in range(2)] for i in range(WORKERS)]
            await asyncio.gather(*(on(i, *pair) for i, pair in enumerate(pairs)))

    asyncio.run(run())
    assert [gw.metric(i, "pggateway_pins_total", 'reason="named_statement"') for i in range(WORKERS)] == pins


def test_a_killed_worker_is_restarted_and_the_port_keeps_answering(gw: Gateway) -> None:
    """SIGKILL of one worker: the other keeps serving the port at once, the supervisor starts a
    new worker in its slot, and connections spread over both again."""
    pids = gw.worker_pids()
    assert len(pids) == WORKERS
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(victim):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for _ in range(10):  # served by the survivor while the slot restarts
        with psycopg.connect(gw.dsn()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    deadline = time.monotonic() + 20
    while len(gw.worker_pids()) < WORKERS or not all(
        _metrics_up(gw.metrics_port + i) for i in range(WORKERS)
    ):
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.05)
    assert victim not in gw.worker_pids()
    time.sleep(0.3)
    assert set(_sessions_by_worker(gw, 24)) == {0, 1}
    assert gw.proc.poll() is None


def test_sigterm_stops_the_supervisor_and_every_worker(tmp_path: Path) -> None:
    """SIGTERM to the supervisor stops both workers gracefully and it exits 0."""
    compute_port = free_port()  # nothing listens: the workers need no compute to start
    cmd = [
        sys.executable,
        "-m",
        "pggateway.standalone",
        f"--port={free_port()}",
        f"--compute-port={compute_port}",
        "--database=app",
        f"--user={USER}",
        f"--data-dir={tmp_path}",
        f"--workers={WORKERS}",
        f"--metrics-port={free_block(WORKERS)}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env())
    g = Gateway(proc, 0, int(cmd[-1].split("=")[1]), None)  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 30
        while not all(_metrics_up(g.metrics_port + i) for i in range(WORKERS)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = g.worker_pids()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not any(_alive(pid) for pid in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
