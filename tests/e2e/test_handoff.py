"""The writer autoscaler end to end: live profile handoffs through the real PG Gateway with real
computes and real clients (psycopg, asyncpg), pinned sessions, a candidate that cannot start,
SIGKILL of the databases service mid-handoff, cgroup limits, and the policy under CPU load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import psycopg
import pytest
from ctrlmesh.databases.v1 import databases_pb2 as dpb
from ctrlmesh.databases.v1 import databases_pb2_grpc as dgrpc

from libs import principal as principals
from tests.fixtures.api import grpc_call
from tests.fixtures.databases import TenantDb, system_md, tenant_with_db, ttl
from tests.fixtures.mesh import Mesh, still_running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# The machine these run on is shared: give the mesh longer to come up than the default minute.
SLOW_START = {"CTRLMESH_START_TIMEOUT": "150s"}
HANDOFF_ENV = {
    **SLOW_START,
    "CTRLMESH_AUTOSCALE_ENABLED": "false",
    "CTRLMESH_AUTOSCALE_COOLDOWN": "0s",
    "CTRLMESH_HANDOFF_DRAIN_TIMEOUT": "1.5s",
    "CTRLMESH_HANDOFF_FREEZE_TIMEOUT": "20s",
    # L3 is allowed here only to carry a setting PostgreSQL refuses: its candidate cannot start.
    "CTRLMESH_AUTOSCALE_MAX_PROFILE": "L3",
    "CTRLMESH_PROFILE_SETTINGS": json.dumps({"L3": {"shared_buffers": "not-a-size"}}),
}
CGROUP = Path("/sys/fs/cgroup")
VCPU = {"L1": 1, "L2": 2, "L3": 3}
MEMORY_MB = {"L1": 1024, "L2": 2048, "L3": 3072}


@pytest.fixture(scope="module")
def hmesh(module_mesh_builder: Callable[..., Mesh]) -> Mesh:
    return module_mesh_builder(**HANDOFF_ENV)


def dsn(mesh: Mesh, t: TenantDb) -> str:
    return f"postgresql://{t.pg_user}:{t.pg_password}@localhost:{mesh.env['CTRLMESH_PG_PORT']}/app?sslmode=require"


def request_handoff(mesh: Mesh, db_id: str, profile: str) -> dpb.Database:
    return grpc_call(
        mesh,
        "databases",
        dgrpc.AutoscalerServiceStub,
        "RequestHandoff",
        dpb.RequestHandoffRequest(db_id=db_id, target_profile=profile),
        principals.system_principal("tests"),
    )


def get_db(mesh: Mesh, db_id: str) -> dict[str, Any]:
    """GET /v2/dbs/{id}, waiting out a databases service that is restarting (503)."""
    deadline = time.monotonic() + 30
    while True:
        r = mesh.admin().get(f"/v2/dbs/{db_id}")
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def wait_scale(mesh: Mesh, db_id: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        db = get_db(mesh, db_id)
        if db["scale_state"] in states:
            return db
        assert time.monotonic() < deadline, f"scale_state {db['scale_state']} never became {states}: {db}"
        time.sleep(0.05)


def postmasters(db_id: str) -> list[int]:
    """PostgreSQL postmasters running on this database's data directory (backends rewrite their
    command line; only the postmaster keeps `-D <dir>`)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"/postgres") and b"-D" in argv:
            data = argv[argv.index(b"-D") + 1].decode()
            if data.rstrip("/").endswith(db_id):
                out.append(int(entry.name))
    return out


def cgroup_of(pid: int, controller: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP / controller / path.lstrip("/")
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


def assert_limits(db_id: str, profile: str) -> None:
    """The one writer's processes (the postmaster and its children) run in a cgroup with the
    profile's CPU quota and memory limit."""
    pids = postmasters(db_id)
    assert len(pids) == 1, pids
    pm = pids[0]
    children = [int(c) for c in Path(f"/proc/{pm}/task/{pm}/children").read_text().split()]
    assert children, "a postmaster without background processes"
    cpu, mem = cgroup_of(pm, "cpu"), cgroup_of(pm, "memory")
    assert cpu.name.startswith(db_id), cpu
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == VCPU[profile] * int(
        (cpu / "cpu.cfs_period_us").read_text()
    )
    assert int((mem / "memory.limit_in_bytes").read_text()) == MEMORY_MB[profile] * 1024 * 1024
    for child in children:
        assert cgroup_of(child, "cpu") == cpu and cgroup_of(child, "memory") == mem


class Events:
    """database.scale_state_changed events of one database, read from /v2/events (SSE)."""

    def __init__(self, mesh: Mesh, db_id: str):
        self.seen: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._listen, args=(mesh, db_id), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _listen(self, mesh: Mesh, db_id: str) -> None:
        with httpx.stream(
            "GET", f"{mesh.base_url}/v2/events", params={"token": mesh.admin_key}, timeout=httpx.Timeout(60)
        ) as r:
            self._ready.set()
            for line in r.iter_lines():
                if self._stop:
                    return
                if line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if ev["type"] == "database.scale_state_changed" and ev["resource_id"] == db_id:
                        self.seen.append(ev["data"])

    def phases(self) -> list[str]:
        return [e["scale_state"] for e in self.seen]

    def stop(self) -> None:
        self._stop = True


class Clients:
    """psycopg and asyncpg clients looping short transactions (autocommit and BEGIN … COMMIT)
    through the gateway; every acknowledged commit is remembered, every error kept."""

    def __init__(self, mesh: Mesh, t: TenantDb, n_psycopg: int = 2, n_asyncpg: int = 2):
        self.dsn = dsn(mesh, t)
        self.stop_flag = threading.Event()
        self.committed: list[str] = []
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._psycopg, args=(f"p{i}",), daemon=True) for i in range(n_psycopg)
        ] + [threading.Thread(target=self._asyncpg, args=(f"a{i}",), daemon=True) for i in range(n_asyncpg)]
        for th in self.threads:
            th.start()

    def _psycopg(self, tag: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            i = 0
            while not self.stop_flag.is_set():
                i += 1
                key = f"{tag}-{i}"
                try:
                    if i % 2:
                        conn.execute("insert into t (k) values (%s)", (key,))
                    else:
                        with conn.transaction():
                            conn.execute("insert into t (k) values (%s)", (key,))
                            conn.execute("select count(*) from t where k = %s", (key,)).fetchone()
                    self.committed.append(key)
                except Exception as err:
                    self.errors.append(f"{tag}: {err!r}")
                    return

    def _asyncpg(self, tag: str) -> None:
        async def loop() -> None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            conn = await asyncpg.connect(self.dsn.split("?")[0], ssl=ctx, timeout=10)
            try:
                i = 0
                while not self.stop_flag.is_set():
                    i += 1
                    key = f"{tag}-{i}"
                    try:
                        if i % 2:
                            await conn.execute("insert into t (k) values ($1)", key)
                        else:
                            async with conn.transaction():
                                await conn.execute("insert into t (k) values ($1)", key)
                                await conn.fetchval("select count(*) from t where k = $1", key)
                        self.committed.append(key)
                    except Exception as err:
                        self.errors.append(f"{tag}: {err!r}")
                        return
            finally:
                await conn.close()

        asyncio.run(loop())

    def finish(self) -> None:
        self.stop_flag.set()
        for th in self.threads:
            th.join(20)
            assert not th.is_alive(), "a client loop hung"


def ready_db(mesh: Mesh) -> TenantDb:
    t = tenant_with_db(mesh)
    with psycopg.connect(dsn(mesh, t), autocommit=True) as conn:
        conn.execute("create table t (k text primary key)")
    assert get_db(mesh, t.db_id)["state"] == "ready"
    return t


def rows(mesh: Mesh, t: TenantDb) -> set[str]:
    with psycopg.connect(dsn(mesh, t), autocommit=True) as conn:
        return {r[0] for r in conn.execute("select k from t").fetchall()}


@pytest.fixture
def db(hmesh: Mesh) -> Iterator[TenantDb]:
    yield ready_db(hmesh)


def test_alternating_handoffs_fail_no_transaction(hmesh: Mesh, db: TenantDb) -> None:
    """Four alternating L1→L2→L1 handoffs under psycopg and asyncpg loops of short transactions
    (autocommit and BEGIN … COMMIT): no client sees an error, every acknowledged commit is
    there, every phase is on /v2/events, and the new writer runs inside its profile's cgroup."""
    events = Events(hmesh, db.db_id)
    clients = Clients(hmesh, db)
    time.sleep(0.5)
    epoch0 = get_db(hmesh, db.db_id)["lease_control_epoch"]
    profiles = ["L2", "L1", "L2", "L1"]
    try:
        for target in profiles:
            before = len(clients.committed)
            accepted = request_handoff(hmesh, db.db_id, target)
            assert accepted.scale_state == "PREPARING" and accepted.candidate_profile == target
            done = wait_scale(hmesh, db.db_id, {"COOLDOWN", "STEADY", "FAILED"})
            assert done["scale_state"] != "FAILED", done
            assert done["current_profile"] == target and done["state"] == "ready"
            assert done["resource_limits_enforced"] is True
            assert_limits(db.db_id, target)
            # The clients go on after the switch (not just survive it).
            deadline = time.monotonic() + 10
            while len(clients.committed) < before + 20:
                assert not clients.errors, clients.errors
                assert time.monotonic() < deadline, "clients made no progress after the handoff"
                time.sleep(0.02)
    finally:
        clients.finish()
        events.stop()
    assert clients.errors == []
    assert len(clients.committed) > 100
    missing = set(clients.committed) - rows(hmesh, db)
    assert not missing, f"{len(missing)} acknowledged commits lost"
    final = get_db(hmesh, db.db_id)
    assert final["lease_control_epoch"] == epoch0 + len(profiles)
    assert final.get("candidate_profile") is None
    one = ["PREPARING", "FREEZING", "DRAINING", "STOPPING_OLD", "STARTING_NEW", "SWITCHING", "COOLDOWN"]
    deadline = time.monotonic() + 5
    while len(events.phases()) < len(one) * len(profiles) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in events.phases() if p != "STEADY"] == one * len(profiles)
    # The control plane counted them, and the gateways learned each freeze from the push stream.
    db_metrics = scrape(
        int(hmesh.env["CTRLMESH_DATABASES_PORT"]) + int(hmesh.env["CTRLMESH_METRICS_PORT_OFFSET"])
    )
    assert db_metrics.get('ctrlmesh_handoffs_total{result="ok"}', 0) >= len(profiles)
    assert db_metrics.get('ctrlmesh_handoff_phase_seconds_count{phase="DRAINING"}', 0) >= len(profiles)
    gw = [scrape(int(hmesh.env["CTRLMESH_PG_METRICS_PORT"]) + i) for i in range(2)]
    assert sum(m.get('pggateway_freezes_total{source="push"}', 0) for m in gw) >= len(profiles)
    assert sum(m.get("pggateway_control_stream_up", 0) for m in gw) == 2
    windows = freeze_windows(events.seen)
    print(f"freeze windows (FREEZING → SWITCHING), ms: {[round(w) for w in windows]}")
    assert len(windows) == len(profiles)


def scrape(port: int) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def freeze_windows(seen: list[dict[str, Any]]) -> list[float]:
    """ms from each handoff's FREEZING to its SWITCHING (the freeze as the control plane holds it)."""
    from datetime import datetime

    def at(e: dict[str, Any]) -> float:
        return datetime.fromisoformat(e["scale_phase_started_at"].replace("Z", "+00:00")).timestamp()

    out, frozen = [], None
    for e in seen:
        if e["scale_state"] == "FREEZING":
            frozen = at(e)
        elif e["scale_state"] == "SWITCHING" and frozen is not None:
            out.append(1000 * (at(e) - frozen))
            frozen = None
    return out


def test_pinned_session_fails_the_handoff_and_keeps_working(hmesh: Mesh, db: TenantDb) -> None:
    """A session holding session state (SET, LISTEN) cannot move: the handoff waits to the drain
    deadline, then goes FAILED pinned_sessions, unfreezes, and the pinned sessions' queries go on
    on the old writer (never killed); unpinned clients never fail."""
    with (
        psycopg.connect(dsn(hmesh, db), autocommit=True) as pinned_set,
        psycopg.connect(dsn(hmesh, db), autocommit=True) as pinned_listen,
    ):
        pinned_set.execute("SET statement_timeout = '123s'")
        pinned_listen.execute("LISTEN handoff_test")
        clients = Clients(hmesh, db, n_psycopg=1, n_asyncpg=1)
        try:
            t0 = time.monotonic()
            request_handoff(hmesh, db.db_id, "L2")
            failed = wait_scale(hmesh, db.db_id, {"FAILED", "COOLDOWN"})
            waited = time.monotonic() - t0
        finally:
            clients.finish()
        assert failed["scale_state"] == "FAILED" and failed["scale_failure_reason"] == "pinned_sessions", (
            failed
        )
        assert waited >= 1.4, "failed before the drain deadline"
        assert failed["current_profile"] == "L1" and failed["freeze_new_checkouts"] is False
        assert pinned_set.execute("SHOW statement_timeout").fetchone() == ("123s",)
        pinned_listen.execute("NOTIFY handoff_test, 'still here'")
        assert [n.payload for n in pinned_listen.notifies(timeout=5, stop_after=1)] == ["still here"]
    assert clients.errors == []
    assert not set(clients.committed) - rows(hmesh, db)
    assert len(postmasters(db.db_id)) == 1


def test_candidate_that_cannot_start_rolls_back(hmesh: Mesh, db: TenantDb) -> None:
    """A candidate whose PostgreSQL refuses its settings: the old profile is started again, the
    handoff is FAILED candidate_failed, and the clients held through it do not fail."""
    clients = Clients(hmesh, db, n_psycopg=1, n_asyncpg=1)
    try:
        request_handoff(hmesh, db.db_id, "L3")
        failed = wait_scale(hmesh, db.db_id, {"FAILED", "COOLDOWN"})
        time.sleep(0.3)
    finally:
        clients.finish()
    assert failed["scale_state"] == "FAILED" and failed["scale_failure_reason"] == "candidate_failed", failed
    assert (
        failed["current_profile"] == "L1" and failed["target_profile"] == "L1" and failed["state"] == "ready"
    )
    assert clients.errors == []
    assert not set(clients.committed) - rows(hmesh, db)
    assert_limits(db.db_id, "L1")


def test_refusals(hmesh: Mesh, db: TenantDb) -> None:
    """RequestHandoff refuses the current profile, one beyond the live bound, a tenant key, and a
    second request during a handoff; `make handoff` prints the reason and exits non-zero."""
    with pytest.raises(grpc.RpcError) as same:
        request_handoff(hmesh, db.db_id, "L1")
    assert same.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as beyond:
        request_handoff(hmesh, db.db_id, "L4")
    assert beyond.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "L4" in str(beyond.value.details())
    import subprocess

    from tests.fixtures.mesh import ROOT

    env = {**hmesh.env}
    ok = subprocess.run(
        ["make", "-s", "handoff", f"DB={db.db_id}", "PROFILE=L2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "handoff accepted" in ok.stdout
    again = subprocess.run(
        ["make", "-s", "handoff", f"DB={db.db_id}", "PROFILE=L2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0 and "InvalidState" in again.stderr, again.stderr
    wait_scale(hmesh, db.db_id, {"COOLDOWN", "STEADY"})


def _kill_databases(mesh: Mesh) -> int:
    pid = mesh.pid("databases")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert not still_running([pid], 5)
    return mesh.wait_new_pid("databases", pid)


def test_sigkill_of_databases_mid_handoff_converges(hmesh: Mesh, db: TenantDb) -> None:
    """The databases service is SIGKILLed while a handoff waits in FREEZING (a gateway that has
    not acknowledged the freeze) and again in DRAINING (a backend still busy): the restarted
    service resumes the handoff, which completes with exactly one writer and nothing lost."""
    with psycopg.connect(dsn(hmesh, db), autocommit=True) as conn:
        conn.execute("insert into t values ('before')")

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(hmesh.grpc_target("databases")) as ch:
            leases = dgrpc.LeaseServiceStub(ch)
            lease = await leases.AcquireLease(
                dpb.AcquireLeaseRequest(
                    tenant_id=db.tenant_id, database="app", holder_id="gw-slow", ttl=ttl(60)
                ),
                metadata=system_md(hmesh),
                timeout=10,
            )
            await asyncio.to_thread(request_handoff, hmesh, db.db_id, "L2")
            assert wait_scale(hmesh, db.db_id, {"FREEZING"}, 10)["freeze_new_checkouts"] is True
            await asyncio.to_thread(_kill_databases, hmesh)
            await asyncio.sleep(1.0)
            assert get_db(hmesh, db.db_id)["scale_state"] == "FREEZING"

            async def renew(**kw: Any) -> None:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        await leases.RenewLease(
                            dpb.RenewLeaseRequest(
                                lease_id=lease.lease_id, epoch=lease.epoch, active_connections=1, **kw
                            ),
                            metadata=system_md(hmesh),
                            timeout=5,
                        )
                        return
                    except grpc.aio.AioRpcError:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.2)

            await renew(frozen=True, busy_backends=1)
            assert wait_scale(hmesh, db.db_id, {"DRAINING"}, 10)
            await asyncio.to_thread(_kill_databases, hmesh)
            await renew(frozen=True, busy_backends=0)

    asyncio.run(scenario())
    done = wait_scale(hmesh, db.db_id, {"COOLDOWN", "STEADY", "FAILED"}, 30)
    # Killed in DRAINING past its 1.5 s deadline it may also roll back; either way one writer.
    assert done["state"] == "ready"
    assert done["current_profile"] == ("L2" if done["scale_state"] != "FAILED" else "L1"), done
    assert len(postmasters(db.db_id)) == 1
    assert "before" in rows(hmesh, db)
    assert_limits(db.db_id, done["current_profile"])


@pytest.fixture(scope="module")
def policy_mesh(module_mesh_builder: Callable[..., Mesh]) -> Mesh:
    return module_mesh_builder(
        **SLOW_START,
        CTRLMESH_AUTOSCALE_INTERVAL="0.25s",
        CTRLMESH_AUTOSCALE_WINDOW="1.5s",
        CTRLMESH_AUTOSCALE_COOLDOWN="1s",
        # Low, because the test machine is shared: the writer gets a small share of its quota.
        CTRLMESH_AUTOSCALE_CPU_UP="0.05",
        CTRLMESH_AUTOSCALE_CPU_DOWN="0.02",
    )


def test_policy_moves_up_under_cpu_load_and_back_down(policy_mesh: Mesh) -> None:
    """CPU-heavy queries push the writer's cgroup CPU use over the threshold for a window: the
    policy hands the database to L2; once the load stops, after twice the window, back to L1."""
    t = ready_db(policy_mesh)
    stop = threading.Event()
    errors: list[str] = []

    def burn() -> None:
        try:
            with psycopg.connect(dsn(policy_mesh, t), autocommit=True) as conn:
                while not stop.is_set():
                    conn.execute("select count(*) from generate_series(1, 300000)").fetchone()
        except Exception as err:
            errors.append(repr(err))

    burners = [threading.Thread(target=burn, daemon=True) for _ in range(2)]
    for b in burners:
        b.start()
    try:
        up = wait_scale(policy_mesh, t.db_id, {"COOLDOWN"}, 30)
        assert up["current_profile"] == "L2", up
    finally:
        stop.set()
        for b in burners:
            b.join(20)
    assert errors == []
    deadline = time.monotonic() + 30
    while get_db(policy_mesh, t.db_id)["current_profile"] != "L1":
        assert time.monotonic() < deadline, get_db(policy_mesh, t.db_id)
        time.sleep(0.1)
