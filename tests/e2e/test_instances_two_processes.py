"""Two instances-service processes against one PostgreSQL: the reconcile claims keep them from
driving the same instance, so a batch of creates and deletes converges with no duplicate
container and no orphan, and both processes do part of the work."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.docker import engine_containers
from tests.fixtures.instances import create_body, make_tenant, wait_gone, wait_state
from tests.fixtures.mesh import ROOT, Mesh, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BATCH = 20


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _second_instances_process(mesh: Mesh) -> subprocess.Popen[str]:
    """Another instances service on the mesh's database (the launcher's child has its URL),
    serving on a port of its own; the edge keeps talking to the first."""
    pid = mesh.pid("instances")
    assert pid is not None
    env = _environ(pid)
    port = free_port()
    env.update(
        {"CTRLMESH_INSTANCES_PORT": str(port), "CTRLMESH_METRICS_PORT_OFFSET": str(free_port() - port)}
    )
    return subprocess.Popen(
        [sys.executable, "-m", "services.instances.main"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def test_two_instances_processes_converge_a_batch_without_duplicates_or_orphans(
    imesh: Mesh, docker_host: str
) -> None:
    """20 creates then 20 deletes with two instances processes reconciling: every instance runs
    with exactly its one container, every delete leaves nothing on the engine, and claims from
    both processes were seen while they worked."""
    first_pid = imesh.pid("instances")
    assert first_pid is not None
    dsn = _environ(first_pid)["CTRLMESH_DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
    second = _second_instances_process(imesh)
    owners: set[str] = set()
    stop = threading.Event()

    def sample_claims() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                for (owner,) in conn.execute("SELECT owner FROM instances.reconcile_claims"):
                    owners.add(owner.split(":")[2])  # the owning process's pid
                time.sleep(0.02)

    sampler = threading.Thread(target=sample_claims, daemon=True)
    try:
        time.sleep(3)  # the second process has migrated and runs its reconcile loop
        assert second.poll() is None, "the second instances process did not stay up"
        sampler.start()
        t = make_tenant(imesh, {"max_instances": BATCH, "max_cpu_millis": 64000, "max_memory_mb": 64000})
        c = t.client()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            created = list(
                pool.map(lambda _: c.post("/v1/instances", json=create_body(replicas=1)), range(BATCH))
            )
        assert all(r.status_code == 201 for r in created), [r.text for r in created if r.status_code != 201]
        ids = [r.json()["id"] for r in created]
        for iid in ids:
            wait_state(c, iid, "running", timeout=120)
        for iid in ids:
            containers = engine_containers(docker_host, iid)
            assert len(containers) == 1, (iid, containers)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            deleted = list(pool.map(lambda iid: c.delete(f"/v1/instances/{iid}"), ids))
        assert all(r.status_code == 202 for r in deleted), [r.text for r in deleted]
        for iid in ids:
            wait_gone(c, iid, timeout=120)
        orphans = {iid: engine_containers(docker_host, iid) for iid in ids}
        assert not any(orphans.values()), orphans
        stop.set()
        sampler.join(5)
        assert {str(first_pid), str(second.pid)} <= owners, owners
    finally:
        stop.set()
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGTERM)
            try:
                second.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(second.pid, signal.SIGKILL)
