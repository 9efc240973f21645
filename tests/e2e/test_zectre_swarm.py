"""Nodes of a real two-node Docker Swarm on loopback (tests/fixtures/swarm.py) registered as a
self_managed cluster: both nodes listed with the swarm's view, drain as Zectre documents it
(availability `pause`: the task on the node keeps running) and `?migrate=true` as Nomad's drain
(availability `drain`: the swarm moves the task to the other node)."""

from __future__ import annotations

import subprocess
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


def test_an_instance_placed_on_the_swarm_cluster_waits_for_drained_nodes_to_scale_up(
    imesh: Mesh, swarm2: Swarm
) -> None:
    """An instance create naming the swarm cluster runs on that swarm (its own `swarm` provider,
    built from the registry's endpoint; `docker` is refused for it); /v1/admin/providers shows
    that provider on that cluster. With both nodes drained a scale-up's extra task is not placed
    while the running one keeps running, the instance says why, and undrain places it."""
    from tests.fixtures.instances import create_body, make_tenant, wait_state

    admin = imesh.admin()
    r = admin.post(
        "/api/v1/clusters",
        json={"name": unique("sw"), "type": "self_managed", "config": {"docker_host": swarm2.manager}},
    )
    assert r.status_code == 201, r.text
    cluster = r.json()
    t = make_tenant(imesh, {"max_instances": 2, "max_cpu_millis": 2000, "max_memory_mb": 1024})
    c = t.client()
    body = create_body(cluster_id=cluster["id"], provider_name="", ports=[])
    refused = c.post("/v1/instances", json={**body, "provider_name": "docker"})
    assert refused.status_code == 400 and "provider_name" in refused.json()["details"]["fields"], refused.text
    made = c.post("/v1/instances", json=body)
    assert made.status_code == 201, made.text
    inst = made.json()
    assert inst["cluster_id"] == cluster["id"] and inst["provider_name"] == "swarm"
    wait_state(c, inst["id"], "running", timeout=90)

    def tasks() -> dict[str, int]:
        out: dict[str, int] = {}
        for svc in swarm2.docker(
            "service", "ls", "--filter", f"label=ctrlmesh.instance={inst['id']}", "-q"
        ).split():
            try:
                per_node = tasks_by_node(swarm2, svc)
            except subprocess.CalledProcessError:
                continue  # removed between the listing and its tasks
            for node, n in per_node.items():
                out[node] = out.get(node, 0) + n
        return out

    assert sum(tasks().values()) == 1
    rows = [p for p in admin.get("/v1/admin/providers").json()["items"] if p["cluster_id"] == cluster["id"]]
    assert [(p["name"], p["healthy"], p["instances"]) for p in rows] == [("swarm", True, 1)]

    nodes = admin.get("/api/v1/nodes", params={"cluster_id": cluster["id"]}).json()
    try:
        for n in nodes:
            assert admin.post(f"/api/v1/nodes/{n['id']}/drain").status_code == 200
        assert c.post(f"/v1/instances/{inst['id']}/scale", json={"replicas": 2}).status_code == 204
        held = wait_for(
            lambda: c.get(f"/v1/instances/{inst['id']}").json(), lambda i: "drained" in i["state_reason"], 45
        )
        assert held["state"] == "running"
        time.sleep(3)
        assert sum(tasks().values()) == 1
    finally:
        for n in nodes:
            admin.post(f"/api/v1/nodes/{n['id']}/undrain")
    wait_for(lambda: sum(tasks().values()), lambda n: n == 2, 60, 0.5)
    wait_for(lambda: c.get(f"/v1/instances/{inst['id']}").json()["state_reason"], lambda r: r == "", 30)
    assert c.delete(f"/v1/instances/{inst['id']}").status_code == 202
    wait_for(lambda: tasks(), lambda t: t == {}, 60, 0.5)
