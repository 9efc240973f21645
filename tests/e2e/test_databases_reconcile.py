"""Reconciliation: the databases service process is SIGKILLed mid-operation (and rows are left in
`booting`, `stopping`, `deleting`, and `ready` with a dead compute); a new process finishes every
one of them. The accounts and databases services run as real processes on a test PostgreSQL,
so one of them can be killed and restarted without the launcher stopping everything."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from ctrlmesh.databases.v1 import databases_pb2 as dpb
from ctrlmesh.databases.v1 import databases_pb2_grpc as dgrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs import principal as principals
from libs.settings import SERVICES
from services.databases.compute.base import ComputeSpec
from services.databases.compute.local import LocalDriver
from tests.fixtures.api import unique
from tests.fixtures.databases import ttl
from tests.fixtures.mesh import ROOT, free_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ADMIN_KEY = "reconcile-test-admin-key"  # not cmk_-shaped: no checksum to satisfy


@dataclass
class Services:
    """accounts + databases as separate processes; each can be killed and started again."""

    env: dict[str, str]
    data_dir: Path
    dsn: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.env[f'CTRLMESH_{name.upper()}_PORT']}"

    def start(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}.main"], cwd=ROOT, env=self.env
        )
        asyncio.run(self._healthy(name))

    async def _healthy(self, name: str) -> None:
        deadline = time.monotonic() + 30
        async with grpc.aio.insecure_channel(self.target(name)) as ch:
            while True:
                try:
                    r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, f"{name} did not start"
                await asyncio.sleep(0.1)

    def kill(self, name: str) -> None:
        p = self.procs.pop(name)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stop_all(self) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()

    def sql(self, statement: str, *args: object) -> list[tuple]:  # type: ignore[type-arg]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(statement, args)
            return cur.fetchall() if cur.description else []


@pytest.fixture
def services(database_url: str) -> Iterator[Services]:
    data_dir = Path(tempfile.mkdtemp(prefix="ctrlmesh-reconcile-"))
    base = free_block(2 * len(SERVICES))
    env = dict(os.environ)
    env.update(
        {
            "CTRLMESH_DATA_DIR": str(data_dir),
            "CTRLMESH_DATABASE_URL": database_url,
            "CTRLMESH_METRICS_PORT_OFFSET": str(len(SERVICES)),
            "CTRLMESH_LOG_LEVEL": "WARNING",
            "CTRLMESH_INTERNAL_SECRET": secrets.token_hex(32),
            "CTRLMESH_KEK": base64.b64encode(secrets.token_bytes(32)).decode(),
            "CTRLMESH_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}",
        }
    )
    for i, name in enumerate(SERVICES):
        env[f"CTRLMESH_{name.upper()}_PORT"] = str(base + i)
    svc = Services(env, data_dir, database_url.replace("postgresql+asyncpg://", "postgresql://"))
    svc.start("accounts")
    svc.start("databases")
    yield svc
    svc.stop_all()
    marker = data_dir / "COMPUTES_LOCATION"
    if marker.exists():
        shutil.rmtree(marker.read_text().strip(), ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)


def _postmasters(db_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if cmd.startswith(b"/") and b"/postgres\0" in cmd and db_id.encode() in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_restarted_service_finishes_every_half_done_operation(services: Services):
    """Kill -9 right after a boot was asked for; leave rows stopping, deleting, and ready with a dead
    compute; the next process boots, stops, deletes and marks lost exactly as desired state says."""
    secret = services.env["CTRLMESH_INTERNAL_SECRET"].encode()
    system = principals.sign(principals.system_principal("tests"), secret)
    tenant = unique("rec")

    async def setup() -> tuple[str, dict[str, str], dpb.Lease]:
        async with (
            grpc.aio.insecure_channel(services.target("accounts")) as ach,
            grpc.aio.insecure_channel(services.target("databases")) as dch,
        ):
            admin = await accounts_pb2_grpc.ApiKeyServiceStub(ach).Authenticate(
                accounts_pb2.AuthenticateRequest(token=ADMIN_KEY), metadata=system
            )
            md = principals.sign(admin, secret)
            t = await accounts_pb2_grpc.TenantServiceStub(ach).CreateTenant(
                accounts_pb2.CreateTenantRequest(name=tenant), metadata=md
            )
            dbs, leases = dgrpc.DatabaseServiceStub(dch), dgrpc.LeaseServiceStub(dch)
            ids = {}
            for name in ("booting", "stopping", "deleting", "crashed"):
                db = await dbs.CreateDatabase(
                    dpb.CreateDatabaseRequest(tenant=tenant, name=name, size="L1"), metadata=md, timeout=30
                )
                ids[name] = db.db_id
            for name in ("stopping", "crashed"):
                lease = await leases.AcquireLease(
                    dpb.AcquireLeaseRequest(
                        tenant_id=t.tenant.id, database=name, holder_id="gw", ttl=ttl(1), wait=True
                    ),
                    metadata=system,
                    timeout=30,
                )
                assert lease.state == "ready"
            half = await leases.AcquireLease(
                dpb.AcquireLeaseRequest(
                    tenant_id=t.tenant.id, database="booting", holder_id="gw", ttl=ttl(1)
                ),
                metadata=system,
            )
            return t.tenant.id, ids, half

    tenant_id, ids, half = asyncio.run(setup())
    # The boot was persisted and has just begun: kill the service in the middle of it.
    services.kill("databases")
    assert half.state == "booting"
    assert services.sql(
        "select state, target_scale from databases.databases where id = %s", ids["booting"]
    ) == [("booting", 1)]
    services.sql(
        "update databases.databases set state = 'stopping', target_scale = 0 where id = %s", ids["stopping"]
    )
    services.sql(
        "update databases.databases set state = 'deleting', target_scale = 0 where id = %s", ids["deleting"]
    )
    (crashed_pid,) = _postmasters(ids["crashed"])
    os.killpg(crashed_pid, signal.SIGKILL)
    assert _postmasters(ids["stopping"]), "the compute outlives the killed service"

    services.start("databases")
    deadline = time.monotonic() + 20
    want = {"booting": "ready", "stopping": "stopped", "crashed": "stopped"}
    while True:
        rows = dict(
            services.sql("select name, state from databases.databases where tenant_id = %s", tenant_id)
        )
        if all(rows.get(k) == v for k, v in want.items()) and "deleting" not in rows:
            break
        assert time.monotonic() < deadline, f"not reconciled: {rows}"
        time.sleep(0.1)
    assert len(_postmasters(ids["booting"])) == 1
    assert not _postmasters(ids["stopping"]) and not _postmasters(ids["crashed"])
    deleted = ComputeSpec(db_id=ids["deleting"], tenant_id=tenant_id, db_name="deleting", role="")
    assert not LocalDriver(services.data_dir).data_path(deleted).exists()
    epoch, last_error = services.sql(
        "select lease_control_epoch, last_error from databases.databases where id = %s", ids["crashed"]
    )[0]
    assert epoch == 2 and last_error == "compute process exited"

    async def wake_crashed() -> dpb.Lease:
        async with grpc.aio.insecure_channel(services.target("databases")) as ch:
            return await dgrpc.LeaseServiceStub(ch).AcquireLease(
                dpb.AcquireLeaseRequest(tenant_id=tenant_id, database="crashed", holder_id="gw", wait=True),
                metadata=system,
                timeout=30,
            )

    assert asyncio.run(wake_crashed()).state == "ready"
    assert len(_postmasters(ids["crashed"])) == 1
