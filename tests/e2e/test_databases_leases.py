"""The lease contract the PG Gateway relies on, through gRPC against real meshes: wake-on-lease
with exactly one compute, renew/release and fencing, idle stop, the stop/wake cycle with data
intact, crash recovery, and every acknowledged commit surviving a SIGKILL of the compute."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import asyncpg
import grpc
import pytest
from ctrlmesh.databases.v1 import databases_pb2 as dpb

from libs import principal as principals
from tests.fixtures.databases import Leases, TenantDb, run, system_md, tenant_with_db, wait_state
from tests.fixtures.mesh import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def _postmasters(db_id: str) -> list[int]:
    """Pids of postgres postmasters serving this database's data directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"/postgres") and any(db_id.encode() in part for part in cmd):
            pids.append(int(proc.name))
    return pids


async def _connect(td: TenantDb, lease: dpb.Lease) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=lease.writer_host,
        port=lease.writer_port,
        user=td.pg_user,
        password=td.pg_password,
        database=td.db["name"],
        timeout=10,
    )


@pytest.fixture(scope="module")
def idle_mesh(module_mesh_builder) -> Mesh:  # type: ignore[no-untyped-def]
    """A private mesh whose databases stop after 2 s without a live lease."""
    return module_mesh_builder(CTRLMESH_IDLE_TIMEOUT="2s")  # type: ignore[no-any-return]


def test_ten_concurrent_first_leases_start_exactly_one_compute(mesh):
    """Ten holders acquiring a stopped database at once all get the same ready writer: one compute."""
    td = tenant_with_db(mesh)

    async def scenario() -> list[dpb.Lease]:
        leases = Leases(mesh)
        try:
            return list(
                await asyncio.gather(*(leases.acquire(td.tenant_id, "app", f"gw-{i}") for i in range(10)))
            )
        finally:
            await leases.close()

    got = run(scenario())
    assert {lease.state for lease in got} == {"ready"}
    assert len({(lease.writer_host, lease.writer_port) for lease in got}) == 1
    assert len({lease.lease_id for lease in got}) == 10 and {lease.epoch for lease in got} == {1}
    assert len(_postmasters(td.db_id)) == 1
    db = mesh.admin().get(f"/v2/dbs/{td.db_id}").json()
    assert db["state"] == "ready" and db["current_scale"] == db["target_scale"] == 1
    assert db["lease_control_epoch"] == 1 and db["worker_id"] and db["last_used_at"]


def test_renew_release_and_fencing(mesh):
    """Renew reports connections; a stale epoch is FAILED_PRECONDITION; unknown leases and databases
    are NOT_FOUND; the service refuses callers that are not the platform."""
    td = tenant_with_db(mesh)

    async def scenario() -> None:
        leases = Leases(mesh)
        try:
            lease = await leases.acquire(td.tenant_id, "app", "gw-a")
            other = await leases.acquire(td.tenant_id, "app", "gw-b")
            renewed = await leases.renew(lease, active=3)
            await leases.renew(other, active=2)
            assert renewed.state == "ready" and renewed.writer_port == lease.writer_port
            assert renewed.expires_at.ToDatetime() >= lease.expires_at.ToDatetime()
            db = mesh.admin().get(f"/v2/dbs/{td.db_id}").json()
            assert db["active_connections"] == 5
            await leases.release(other)
            await leases.release(other)  # idempotent
            assert mesh.admin().get(f"/v2/dbs/{td.db_id}").json()["active_connections"] == 3

            stale = dpb.Lease(lease_id=lease.lease_id, epoch=lease.epoch + 7)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await leases.renew(stale)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await leases.renew(dpb.Lease(lease_id="no-such-lease", epoch=1))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await leases.acquire(td.tenant_id, "nope")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await leases.stub.AcquireLease(
                    dpb.AcquireLeaseRequest(tenant_id=td.tenant_id, database="app", holder_id="x"),
                    metadata=principals.sign(
                        principals.Principal(key_id="k", scope="global"), mesh.internal_secret
                    ),
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            resolved = await leases.dbs.ResolveDatabase(
                dpb.ResolveDatabaseRequest(tenant_id=td.tenant_id, name="app"), metadata=system_md(mesh)
            )
            assert (resolved.writer_host, resolved.writer_port) == (lease.writer_host, lease.writer_port)
            await leases.release(lease)
        finally:
            await leases.close()

    run(scenario())


def test_idle_stop_cycle_keeps_data_and_respects_live_leases(idle_mesh):
    """While a lease is renewed the database stays ready; after release it stops within the idle
    timeout; the next lease wakes it with the data intact."""
    td = tenant_with_db(idle_mesh)

    async def scenario() -> None:
        leases = Leases(idle_mesh)
        try:
            lease = await leases.acquire(td.tenant_id, "app", ttl_s=2)
            conn = await _connect(td, lease)
            await conn.execute("create table notes (id int primary key, body text)")
            await conn.execute("insert into notes values (1, 'survives idle stop')")
            await conn.close()
            for _ in range(6):  # 3 s of renewals: longer than the idle timeout
                await asyncio.sleep(0.5)
                lease = await leases.renew(lease, active=1)
                assert lease.state == "ready"
            await leases.release(lease)
            t0 = time.monotonic()
            stopped = await asyncio.to_thread(wait_state, idle_mesh, td.db_id, "stopped", 10)
            assert stopped is not None and 1.5 < time.monotonic() - t0 < 6
            assert stopped["current_scale"] == stopped["target_scale"] == 0 and stopped["worker_id"] == ""
            assert not _postmasters(td.db_id)

            again = await leases.acquire(td.tenant_id, "app")
            assert again.state == "ready" and again.epoch == lease.epoch + 1
            conn = await _connect(td, again)
            assert await conn.fetchval("select body from notes where id = 1") == "survives idle stop"
            await conn.close()
            await leases.release(again)
        finally:
            await leases.close()

    run(scenario())
    usage = idle_mesh.admin().get("/v2/billing/summary").json()["usage"]
    assert usage["compute_cu_hours_by_profile"]["L1"] > 0


def test_an_expired_lease_stops_protecting_the_database(idle_mesh):
    """A holder that vanishes without releasing (its lease expires) does not keep the writer up."""
    td = tenant_with_db(idle_mesh)

    async def scenario() -> None:
        leases = Leases(idle_mesh)
        try:
            await leases.acquire(td.tenant_id, "app", ttl_s=1)
        finally:
            await leases.close()

    run(scenario())
    wait_state(idle_mesh, td.db_id, "stopped", 10)


def test_every_acknowledged_commit_survives_a_sigkill_of_the_compute(idle_mesh):
    """Writers record each key once its commit is acknowledged; the compute's process group is
    SIGKILLed under load; the crash is noticed, a new lease restarts it, and every key is there."""
    td = tenant_with_db(idle_mesh)

    async def scenario() -> None:
        leases = Leases(idle_mesh)
        try:
            lease = await leases.acquire(td.tenant_id, "app")
            setup = await _connect(td, lease)
            await setup.execute("create table acked (k bigint primary key, v text not null)")
            await setup.close()
            acked: set[int] = set()
            stop = asyncio.Event()

            async def writer(w: int) -> None:
                conn = await _connect(td, lease)
                k = w * 1_000_000
                try:
                    while not stop.is_set():
                        k += 1
                        await conn.execute("insert into acked values ($1, 'x')", k)
                        acked.add(k)  # only after the server acknowledged the commit
                except Exception:  # the kill surfaces as whatever asyncpg was doing: the writer ends
                    return

            tasks = [asyncio.create_task(writer(w)) for w in range(8)]
            await asyncio.sleep(1.0)
            (pid,) = _postmasters(td.db_id)
            os.killpg(pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            stop.set()
            assert len(acked) > 100, "the load should have committed plenty before the kill"

            lost = await asyncio.to_thread(wait_state, idle_mesh, td.db_id, "stopped", 10)
            assert lost is not None and lost["lease_control_epoch"] == lease.epoch + 1
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await leases.renew(lease)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (
                "the lost writer's lease is fenced"
            )

            again = await leases.acquire(td.tenant_id, "app")
            assert again.state == "ready"
            conn = await _connect(td, again)
            present = {r["k"] for r in await conn.fetch("select k from acked")}
            await conn.close()
            missing = acked - present
            assert not missing, f"{len(missing)} acknowledged commits lost"
            await leases.release(again)
        finally:
            await leases.close()

    run(scenario())


def test_rotated_credentials_reach_running_and_stopped_computes(mesh):
    """After a rotation the new password logs in to a running writer within a moment (the old one
    stops working), and to a stopped one from its next boot."""
    td = tenant_with_db(mesh)
    c = mesh.admin()
    assert c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "later", "size": "L1"}).status_code == 201

    async def scenario() -> None:
        leases = Leases(mesh)
        try:
            lease = await leases.acquire(td.tenant_id, "app")
            old_password = td.pg_password
            r = await asyncio.to_thread(c.post, f"/v2/tenants/{td.tenant}/credentials/rotate")
            td.pg_password = r.json()["pg_password"]
            # A moment: the rotation's event reaches the databases service, which alters the role
            # on the running writer (CI on a loaded machine once took longer than 5 s).
            deadline = time.monotonic() + 15
            while True:
                try:
                    await (await _connect(td, lease)).close()
                    break
                except asyncpg.InvalidPasswordError:
                    assert time.monotonic() < deadline, "the running writer never got the new verifier"
                    await asyncio.sleep(0.05)
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(
                    host=lease.writer_host,
                    port=lease.writer_port,
                    user=td.pg_user,
                    password=old_password,
                    database="app",
                )
            later = await leases.acquire(td.tenant_id, "later")
            conn = await asyncpg.connect(
                host=later.writer_host,
                port=later.writer_port,
                user=td.pg_user,
                password=td.pg_password,
                database="later",
            )
            await conn.close()
        finally:
            await leases.close()

    run(scenario())
