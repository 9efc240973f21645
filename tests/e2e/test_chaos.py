"""Crashes and stops under load: `kill -9` of a service in the middle of its long operations, 5
rounds of each (CTRLMESH_CHAOS_ROUNDS; bench/chaos.py runs 20): databases during a create, a
delete and a compute boot, and during a live handoff; accounts during a tenant's cascade delete;
instances during a deploy and an instance delete; network while a certificate is being issued by
Pebble; and SIGTERM of the edge while 16 clients hammer it. The launcher restarts what dies; the
platform keeps serving, every operation converges, nothing is duplicated or left behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.fixtures.acme import Pebble
from tests.fixtures.api import unique
from tests.fixtures.chaos import (
    CHAOS_ENV,
    CertificateChaos,
    ClustersChaos,
    DatabaseChaos,
    HandoffChaos,
    InstanceChaos,
    TenantChaos,
    pebble_env,
)
from tests.fixtures.dns import DnsServer
from tests.fixtures.instances import MESH_ENV
from tests.fixtures.mesh import Mesh, free_port

pytestmark = [pytest.mark.e2e]

# Rounds per operation in the suite: 3 keep `make test` near its time budget (at 5 the whole
# suite took 23 min on 2 cores); CTRLMESH_CHAOS_ROUNDS=5 runs the count issue 9 asks for, and
# bench/chaos.py runs 20.
ROUNDS = int(os.environ.get("CTRLMESH_CHAOS_ROUNDS", "3"))


@pytest.fixture(scope="module")
def pebble(pebble_factory: Any) -> Pebble:
    return pebble_factory(free_port())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def chaos_mesh(module_mesh_builder: Any, docker_host: str, pebble: Pebble, dns_server: DnsServer) -> Mesh:
    """A private mesh (its services get killed) on the test engine, restarting at once, issuing
    certificates from Pebble."""
    return module_mesh_builder(  # type: ignore[no-any-return]
        DOCKER_HOST=docker_host, **MESH_ENV, **CHAOS_ENV, **pebble_env(pebble, dns_server.address)
    )


@pytest.mark.timeout(300)
def test_kill9_of_databases_during_create_delete_and_boot_converges(chaos_mesh):
    """Each round: a create in `creating`, a delete after its 202 and a compute booting for a first
    connection, then `kill -9` of databases: accounts keeps answering, the service comes back,
    the new database is `stopped` exactly once, the deleted one is gone with no compute left,
    the next connection works on exactly one compute, and the tenant's list is exact."""
    chaos = DatabaseChaos(chaos_mesh)
    results = [chaos.round() for _ in range(ROUNDS)]
    assert all(r.checks["accounts answered"] == 200 for r in results), [r.checks for r in results]
    # Every round's kill landed while some operation was still in flight.
    assert any(r.checks["states at kill"]["new"] == "creating" for r in results), [r.checks for r in results]


@pytest.mark.timeout(300)
def test_kill9_of_instances_during_deploy_and_delete_converges(chaos_mesh, docker_host):
    """Each round: a rolling deploy right after its 201 and an instance delete right after its
    202, then `kill -9` of instances: the deployment ends succeeded or failed and the instance
    serves exactly that outcome's release with exactly its replicas, the deleted instance is
    gone with no container left on the engine."""
    chaos = InstanceChaos(chaos_mesh, docker_host)
    try:
        results = [chaos.round() for _ in range(ROUNDS)]
    finally:
        chaos.close()
    assert all(r.checks["accounts answered"] == 200 for r in results), [r.checks for r in results]


@pytest.mark.timeout(300)
def test_kill9_of_databases_mid_handoff_converges(chaos_mesh):
    """Each round: a live handoff to the other profile under a committing client, then `kill -9`
    of databases as soon as it leaves STEADY: the database ends ready on exactly one writer, in
    the target profile (the old one if the handoff failed), with every acknowledged commit."""
    chaos = HandoffChaos(chaos_mesh)
    results = [chaos.round() for _ in range(ROUNDS)]
    # The kills landed inside the handoff, not before or after it.
    assert all(r.checks["states at kill"]["handoff"] != "STEADY" for r in results), [
        r.checks for r in results
    ]


@pytest.mark.timeout(300)
def test_kill9_of_network_during_certificate_issuance_converges(chaos_mesh, pebble, dns_server):
    """Each round: a verified domain asks Pebble for its certificate, then `kill -9` of network
    while the order is being validated: after the restart exactly one certificate is issued and
    recorded for the domain, and the ingress serves it (valid for the hostname)."""
    chaos = CertificateChaos(chaos_mesh, dns_server.zone, pebble.root_pem())
    try:
        results = [chaos.round() for _ in range(ROUNDS)]
    finally:
        chaos.close()
    assert all(r.checks["instance answered"] == 200 for r in results), [r.checks for r in results]
    assert any(r.checks["states at kill"]["certificate"] == "challenge published" for r in results), [
        r.checks for r in results
    ]


@pytest.mark.timeout(300)
def test_kill9_of_clusters_during_a_managed_create_and_an_instantiate_converges(chaos_mesh):
    """Each round: a managed-database create and a template instantiation with a database in
    flight, then `kill -9` of clusters: what got no 201 is sent again; each name ends with exactly
    one managed database, the app bound to its own, no backing database or app without one."""
    chaos = ClustersChaos(chaos_mesh)
    results = [chaos.round() for _ in range(ROUNDS)]
    assert all(r.checks["accounts answered"] == 200 for r in results), [r.checks for r in results]
    # The kills landed inside the instantiation (its app made, no answer yet).
    assert any(r.checks["states at kill"]["instantiate"] == "app made" for r in results), [
        r.checks for r in results
    ]


@pytest.mark.timeout(180)
def test_sigterm_of_the_edge_under_load_drains_and_comes_back(chaos_mesh):
    """16 clients GET in a loop and an SSE stream is open; SIGTERM the edge: no 5xx but 503, the
    edge process exits within 30 s (graceful), the launcher starts a new one, and the clients
    get 200s from it."""
    mesh = chaos_mesh
    c = mesh.admin()
    name = unique("sig")
    assert c.post("/v2/tenants", json={"name": name}).status_code == 201
    key = mesh.admin_key
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    after_restart: Counter[int] = Counter()
    stop = threading.Event()
    restarted = threading.Event()
    lock = threading.Lock()

    def hammer() -> None:
        with httpx.Client(
            base_url=mesh.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=10
        ) as h:
            while not stop.is_set():
                try:
                    r = h.get(f"/v2/tenants/{name}")
                except httpx.HTTPError as exc:
                    with lock:
                        errors[type(exc).__name__] += 1
                    # Refused while no edge listens: back off, or 16 spinning clients starve the
                    # new edge of CPU on a small machine.
                    time.sleep(0.1)
                    continue
                with lock:
                    statuses[r.status_code] += 1
                    if restarted.is_set():
                        after_restart[r.status_code] += 1

    def stream() -> None:
        try:
            with httpx.stream(
                "GET", f"{mesh.base_url}/v2/events", params={"token": key}, timeout=httpx.Timeout(60)
            ) as r:
                for _ in r.iter_raw():
                    if stop.is_set():
                        return
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=hammer) for _ in range(16)] + [threading.Thread(target=stream)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while sum(statuses.values()) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert statuses[200] > 0, (statuses, errors)
        old = mesh.pid("edge")
        assert old is not None
        os.kill(old, signal.SIGTERM)
        sent = time.monotonic()
        while _alive(old):
            assert time.monotonic() - sent < 30, "the edge did not exit within 30 s of SIGTERM"
            time.sleep(0.05)
        exited = time.monotonic() - sent
        new = mesh.wait_new_pid("edge", old, timeout=30)
        restarted.set()
        deadline = time.monotonic() + 60
        while after_restart[200] < 50:
            assert time.monotonic() < deadline, ("no 200s from the new edge", after_restart, errors)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    bad = {s: n for s, n in statuses.items() if s >= 500 and s != 503}
    assert not bad, (statuses, errors)
    assert new != old and exited < 30
    assert set(statuses) <= {200, 503}, statuses


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(240)
def test_kill9_of_accounts_during_a_tenant_cascade_delete_converges(chaos_mesh):
    """Each round: a tenant with two databases deleted with cascade (202), then `kill -9` of
    accounts: an open PG connection keeps answering, REST says 503 (never 500), the tenant and
    its databases go, no compute is left, the name is free again."""
    chaos = TenantChaos(chaos_mesh)
    try:
        results = [chaos.round() for _ in range(ROUNDS)]
    finally:
        chaos.close()
    assert all(r.checks["pg answered"] == "ok" for r in results), [r.checks for r in results]
    # Once accounts answers the edge, databases reaches it too within about a second.
    lags = [r.checks["databases → accounts lag s"] for r in results]
    assert max(lags) < 2.5, lags
