"""Lifecycle actions that arrive while the engine is still working on the previous one end where
the last action says, on a real Docker engine: the reconciler decides on the instance's desired
state as it is when the engine step finishes, not as it was when the step began."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.fixtures.instances import (
    MESH_ENV,
    V2,
    create_running,
    destroy,
    make_tenant,
    page,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.e2e

# The test image's httpd is PID 1 and ignores SIGTERM, so each stop takes this long: a window
# wide enough that the second action surely arrives while the instance is `stopping`.
STOP = 4


@pytest.fixture(scope="module")
def slow_stop(module_mesh_builder, docker_host):
    return module_mesh_builder(
        DOCKER_HOST=docker_host, **{**MESH_ENV, "CTRLMESH_INSTANCE_STOP_TIMEOUT": f"{STOP}s"}
    )


@pytest.fixture
def running_instance(slow_stop, docker_host):
    tenant = make_tenant(slow_stop, {"max_instances": 5, "max_cpu_millis": 8000, "max_memory_mb": 8192})
    c = tenant.client()
    inst = create_running(c)
    yield tenant, inst
    destroy(c, docker_host, inst["id"])


def _stopping(c, iid: str) -> None:
    assert c.get(f"/v1/instances/{iid}").json()["state"] == "stopping"


def _running_containers(docker_host: str, instance_id: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "--filter", f"label=ctrlmesh.instance={instance_id}", "--format", "{{.Names}}"],
        env=dict(os.environ, DOCKER_HOST=docker_host),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.split()


def _running_with_page(c, iid: str, timeout: float = 30) -> dict:
    inst = wait_state(c, iid, "running", timeout=timeout)
    assert inst["endpoints"], inst
    assert page(inst["endpoints"][0]["url"]) == "ctrlmesh-test v1"
    return inst


def test_suspend_then_unsuspend_at_once_ends_running(running_instance, docker_host):
    """Unsuspend right after suspend (while the engine still stops the container): running
    again with an endpoint that serves, not left stopped."""
    tenant, inst = running_instance
    c = tenant.client()
    iid = inst["id"]
    for _ in range(2):
        assert c.post(f"/v1/instances/{iid}/suspend", json={"reason": "r"}).status_code == 204
        _stopping(c, iid)
        assert c.post(f"/v1/instances/{iid}/unsuspend", json={"reason": "r"}).status_code == 204
        back = _running_with_page(c, iid)
        assert back["suspended_at"] is None
    assert len(_running_containers(docker_host, iid)) == 1


def test_stop_then_start_at_once_ends_running(running_instance):
    """start (or restart) right after stop, the instance still `stopping`, is accepted and the
    instance comes back running; a start while running stays 409."""
    tenant, inst = running_instance
    c = tenant.client()
    iid = inst["id"]
    assert c.post(f"/v1/instances/{iid}/stop").status_code == 204
    _stopping(c, iid)
    r = c.post(f"/v1/instances/{iid}/start")
    assert r.status_code == 204, r.text
    _running_with_page(c, iid)
    assert c.post(f"/v1/instances/{iid}/start").status_code == 409
    # restart while stopping likewise brings it back.
    assert c.post(f"/v1/instances/{iid}/stop").status_code == 204
    _stopping(c, iid)
    assert c.post(f"/v1/instances/{iid}/restart").status_code == 204
    _running_with_page(c, iid)
    # And the plain order still works: stop to the end, then start.
    assert c.post(f"/v1/instances/{iid}/stop").status_code == 204
    wait_state(c, iid, "stopped")
    assert c.post(f"/v1/instances/{iid}/start").status_code == 204
    _running_with_page(c, iid)


def test_deploy_while_stopping_is_refused_and_the_instance_stops(running_instance, docker_host):
    """A deployment asked for while the instance stops is 409 InvalidState, nothing is left in
    flight, and the instance reaches stopped with no container running."""
    tenant, inst = running_instance
    c = tenant.client()
    iid = inst["id"]
    assert c.post(f"/v1/instances/{iid}/stop").status_code == 204
    _stopping(c, iid)
    r = c.post(f"/v1/instances/{iid}/deploy", json={"image": V2})
    assert r.status_code == 409 and r.json()["error"] == "InvalidState", r.text
    stopped = wait_state(c, iid, "stopped")
    assert stopped["endpoints"] == []
    deps = c.get(f"/v1/instances/{iid}/deployments").json()
    assert not [d for d in deps.get("items", []) if d["state"] in ("pending", "running")], deps
    wait_for(lambda: _running_containers(docker_host, iid), lambda names: names == [], timeout=10)


def test_a_deploy_then_stop_at_once_cancels_it_and_stops(running_instance):
    """stop right after a deploy is accepted: the deployment ends cancelled (or finished before
    the stop), never in flight, and the instance is stopped."""
    tenant, inst = running_instance
    c = tenant.client()
    iid = inst["id"]
    r = c.post(f"/v1/instances/{iid}/deploy", json={"image": V2})
    assert r.status_code in (201, 202), r.text
    dep = r.json()
    assert c.post(f"/v1/instances/{iid}/stop").status_code == 204
    wait_state(c, iid, "stopped", timeout=30)
    final = wait_for(
        lambda: c.get(f"/v1/deployments/{dep['id']}").json(),
        lambda d: d.get("state") not in ("pending", "running"),
        timeout=30,
    )
    assert final["state"] in ("cancelled", "succeeded", "failed"), final
    assert c.post(f"/v1/instances/{iid}/start").status_code == 204
    wait_state(c, iid, "running", timeout=30)
