"""Nodes of a real two-node Docker Swarm on loopback (tests/fixtures/swarm.py) registered as a
self_managed cluster: both nodes listed with the swarm's view, drain as Zectre documents it
(availability `pause`: the task on the node keeps running) and `?migrate=true` as Nomad's drain
(availability `drain`: the swarm moves the task to the other node)."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.api import unique
from tests.fixtures.instances import wait_for
from tests.fixtures.mesh import Mesh
from tests.fixtures.swarm import Swarm

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def tasks_by_node(s: Swarm, service: str) -> dict[str, int]:
    """Running tasks of a swarm service per node id."""
    out: dict[str, int] = {}
    for line in s.docker(
        "service", "ps", service, "--filter", "desired-state=running", "--format", "{{.ID}}"
    ).split():
        node, state = s.docker("inspect", "--format", "{{.NodeID}} {{.Status.State}}", line).split()
        if state == "running":
            out[node] = out.get(node, 0) + 1
    return out


def test_two_node_swarm_drain_pauses_and_migrate_moves_tasks(imesh: Mesh, swarm2: Swarm) -> None:
    """Registering the swarm probes it and lists both nodes; drain keeps the worker's task
    running while the node reads `draining`; undrain makes it `ready`; drain with migrate moves
    the task to the manager; the engine's availability follows each change."""
    admin = imesh.admin()
    r = admin.post(
        "/api/v1/clusters",
        json={"name": unique("sw"), "type": "self_managed", "config": {"docker_host": swarm2.manager}},
    )
    assert r.status_code == 201, r.text
    cluster = r.json()
    assert cluster["node_count"] == 2 and cluster["config"]["docker_host"] == swarm2.manager
    # A worker's engine is refused: it cannot manage the swarm.
    bad = admin.post(
        "/api/v1/clusters",
        json={"name": unique("sw"), "type": "self_managed", "config": {"docker_host": swarm2.worker}},
    )
    assert bad.status_code == 400 and "manager" in bad.json()["message"]

    nodes = admin.get("/api/v1/nodes", params={"cluster_id": cluster["id"]}).json()
    assert sorted(n["role"] for n in nodes) == ["manager", "worker"]
    assert all(n["status"] == "ready" for n in nodes)
    worker = next(n for n in nodes if n["role"] == "worker")
    manager = next(n for n in nodes if n["role"] == "manager")

    def engine() -> str:
        return swarm2.docker("node", "inspect", "--format", "{{.Spec.Availability}}", worker["engine_id"])

    svc = unique("t")
    swarm2.docker(
        "service",
        "create",
        "-d",
        "--name",
        svc,
        "--replicas",
        "2",
        "--placement-pref",
        "spread=node.id",
        "ctrlmesh-test/httpd:v1",
    )
    try:
        wait_for(
            lambda: tasks_by_node(swarm2, svc),
            lambda m: m == {worker["engine_id"]: 1, manager["engine_id"]: 1},
            60,
            0.5,
        )
        live = wait_for(
            lambda: admin.get(f"/api/v1/clusters/{cluster['id']}").json(),
            lambda c: c["running_tasks"] == 2,
            15,
        )
        assert live["node_count"] == 2

        d = admin.post(f"/api/v1/nodes/{worker['id']}/drain").json()
        assert d["status"] == "draining" and d["availability"] == "pause"
        assert engine() == "pause"
        time.sleep(3)  # the swarm had its chance to move the task: it must not have
        assert tasks_by_node(swarm2, svc).get(worker["engine_id"]) == 1
        assert admin.get(f"/api/v1/nodes/{worker['id']}").json()["status"] == "draining"

        u = admin.post(f"/api/v1/nodes/{worker['id']}/undrain").json()
        assert u["status"] == "ready" and engine() == "active"

        m = admin.post(f"/api/v1/nodes/{worker['id']}/drain", params={"migrate": "true"})
        assert m.status_code == 200 and m.json()["availability"] == "drain"
        assert engine() == "drain"
        wait_for(lambda: tasks_by_node(swarm2, svc), lambda t: t == {manager["engine_id"]: 2}, 60, 0.5)
    finally:
        swarm2.docker("service", "rm", svc)
        admin.post(f"/api/v1/nodes/{worker['id']}/undrain")
