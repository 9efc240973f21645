"""The launcher keeps the platform up when a process dies: it restarts it (new pid, requests
succeed again), gives up on one that keeps crashing while the rest serves, and never restarts
anything during shutdown."""

import os
import signal
import time

import httpx
import pytest

from libs.launcher import _wait_pg_gateway
from tests.fixtures.api import create_account, unique
from tests.fixtures.mesh import still_running

pytestmark = pytest.mark.e2e

LIMIT = 2


@pytest.fixture(scope="module")
def sup(module_mesh_builder):
    """A private mesh with a short backoff and a small restart budget, so the tests are quick."""
    return module_mesh_builder(
        CTRLMESH_RESTART_BACKOFF="0.2s", CTRLMESH_RESTART_LIMIT=str(LIMIT), CTRLMESH_RESTART_WINDOW="60s"
    )


def _until(fn, timeout: float):
    """fn() until it returns a truthy value (exceptions count as not yet); that value, or fail."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if value := fn():
                return value
        except httpx.HTTPError as err:
            last = err
        time.sleep(0.05)
    pytest.fail(f"not within {timeout} s (last: {last!r})")


def test_kill_9_of_accounts_restarts_it_and_requests_succeed_again(sup):
    """kill -9 of accounts: a new accounts process, the tenant answers again within seconds,
    and the launcher is still running."""
    _, key = create_account(sup)
    c = sup.client(key, timeout=5)
    name = unique("sv")
    assert c.post("/v2/tenants", json={"name": name}).status_code == 201
    old = sup.pid("accounts")
    assert old is not None
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new = sup.wait_new_pid("accounts", old, timeout=15)
    assert new != old
    _until(lambda: c.get(f"/v2/tenants/{name}").status_code == 200, timeout=30)
    elapsed = time.monotonic() - t0
    assert sup.proc.poll() is None, "the launcher exited"
    assert "accounts is serving again" in sup.wait_output("accounts is serving again", timeout=10)
    # About 2 s on an idle machine; the bound leaves room for a loaded one.
    assert elapsed < 20, f"requests succeeded again only after {elapsed:.1f} s"
    # A write, not only a read: the restarted service is fully usable.
    assert c.post("/v2/tenants", json={"name": unique("sv")}).status_code == 201


def test_the_edge_and_the_pg_gateway_are_restarted_too(sup):
    """kill -9 of the edge and of the PG Gateway: each comes back with a new pid and answers."""
    for name in ("edge", "pggateway"):
        old = sup.pid(name)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        assert sup.wait_new_pid(name, old, timeout=10) != old
    _until(lambda: httpx.get(f"{sup.base_url}/health", timeout=2).status_code == 200, timeout=20)
    _wait_pg_gateway("127.0.0.1", int(sup.env["CTRLMESH_PG_PORT"]), time.monotonic() + 20)
    assert sup.proc.poll() is None


def test_a_service_that_keeps_crashing_ends_failed_and_the_rest_serves(sup):
    """network killed more often than its restart budget: logged as failed, no longer restarted,
    named by /health; tenants (accounts, databases) keep answering."""
    _, key = create_account(sup)
    c = sup.client(key, timeout=5)
    pid = sup.pid("network")
    for _ in range(LIMIT):
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        pid = sup.wait_new_pid("network", pid, timeout=10)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    sup.wait_output("network FAILED", timeout=10)
    time.sleep(1)  # longer than any backoff here: a restart would have happened by now
    assert sup.pid("network") is None
    health = _until(
        lambda: (r := httpx.get(f"{sup.base_url}/health", timeout=5)).status_code == 503 and r, 10
    )
    assert health.json()["status"] == "degraded" and "network" in health.json()["failing"], health.text
    assert health.json()["failing"] == {"network": "FAILED"}, health.text
    assert c.post("/v2/tenants", json={"name": unique("sv")}).status_code == 201
    assert sup.proc.poll() is None


def test_health_names_a_pg_gateway_being_restarted_and_one_given_up_on(sup):
    """The PG Gateway (no gRPC health to probe) killed: /health is 503 naming it RESTARTING
    until it serves again, then no longer names it; killed past its restart budget: 503 naming
    it FAILED, and the launcher keeps running."""

    def failing() -> dict[str, str]:
        r = httpx.get(f"{sup.base_url}/health", timeout=5)
        return dict(r.json().get("failing", {})) if r.status_code == 503 else {}

    before = failing()
    assert "pggateway" not in before, before
    pid = sup.pid("pggateway")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    seen = _until(lambda: failing().get("pggateway"), timeout=10)
    assert seen == "RESTARTING", seen
    pid = sup.wait_new_pid("pggateway", pid, timeout=10)
    _until(lambda: "pggateway" not in failing(), timeout=20)

    # Past the budget (the earlier tests used some of it): given up on, and /health says so.
    def given_up() -> bool:
        return any("pggateway FAILED" in line for line in sup.output)

    for _ in range(LIMIT + 1):
        if given_up():
            break
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _until(lambda old=pid: given_up() or (sup.pid("pggateway") or old) != old, timeout=10)
        pid = sup.pid("pggateway")
    assert given_up(), sup.output[-5:]
    assert _until(lambda: failing().get("pggateway") == "FAILED", timeout=10)
    assert sup.pid("pggateway") is None
    assert sup.proc.poll() is None


def test_no_restart_during_shutdown_and_nothing_left_behind(sup):
    """A process that dies just before SIGTERM is not restarted; the launcher exits 0 and every
    process it started is gone."""
    pids = sup.pids()
    accounts = sup.pid("accounts")
    assert accounts is not None
    os.kill(accounts, signal.SIGKILL)
    assert sup.stop(signal.SIGTERM, timeout=30) == 0
    assert not any("accounts restarted" in line for line in sup.output[-5:])
    assert not (sup.data_dir / "run" / "accounts.pid").exists()
    assert still_running(pids) == []
