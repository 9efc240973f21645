"""The swarm provider on a single-node swarm, and reconciliation across a restart of the
whole mesh (the deployment in flight resumes and finishes)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures.docker import engine_containers, engine_services
from tests.fixtures.instances import (
    MESH_ENV,
    V2,
    create_body,
    make_tenant,
    page,
    wait_deployment,
    wait_for,
    wait_gone,
    wait_state,
)

pytestmark = pytest.mark.e2e


def test_swarm_instances_scale_deploy_and_delete(imesh, docker_host):
    """On `swarm`: one swarm service per release with the replicas and limits, tasks answering on
    their published ports, scale and a rolling deploy, and nothing left after delete."""
    t = make_tenant(imesh)
    c = t.client()
    r = c.post("/v1/instances", json=create_body(provider_name="swarm", replicas=2))
    assert r.status_code == 201, r.text
    iid = r.json()["id"]
    inst = wait_state(c, iid, "running", timeout=60)
    assert inst["provider_name"] == "swarm" and len(inst["endpoints"]) == 2
    assert {page(e["url"]) for e in inst["endpoints"]} == {"ctrlmesh-test v1"}
    [svc] = engine_services(docker_host, iid)
    assert svc.startswith(f"cm-{iid}-main-")
    assert c.post(f"/v1/instances/{iid}/scale", json={"replicas": 3}).status_code == 204
    wait_for(lambda: c.get(f"/v1/instances/{iid}").json(), lambda i: len(i["endpoints"]) == 3, 60)
    dep = c.post(f"/v1/instances/{iid}/deploy", json={"image": V2, "strategy": "rolling"}).json()
    done = wait_deployment(c, dep["id"], ("succeeded", "failed"), timeout=90)
    assert done["state"] == "succeeded", done
    after = c.get(f"/v1/instances/{iid}").json()
    assert {page(e["url"]) for e in after["endpoints"]} == {"ctrlmesh-test v2"}
    [svc2] = engine_services(docker_host, iid)
    assert svc2 != svc
    res = c.get(f"/v1/instances/{iid}/resources")
    assert res.status_code == 200 and res.json()["memory_limit_mb"] == 3 * 32
    assert c.delete(f"/v1/instances/{iid}").status_code == 202
    wait_gone(c, iid, timeout=60)
    assert engine_services(docker_host, iid) == []
    wait_for(lambda: engine_containers(docker_host, iid), lambda names: names == [], 30)


def test_a_restarted_mesh_resumes_the_deployment_in_flight(module_mesh_builder, docker_host):
    """Stop the mesh in the middle of a rolling deploy; a new mesh on the same data directory
    picks the deployment up and finishes it: v2 on every replica, no v1 container left."""
    data = Path(tempfile.mkdtemp(prefix="ctrlmesh-resume-"))
    env = {
        **MESH_ENV,
        "DOCKER_HOST": docker_host,
        "CTRLMESH_DATA_DIR": str(data),
        "CTRLMESH_DEPLOY_SETTLE": "2s",
    }
    first = module_mesh_builder(**env)
    key = (data / "admin-api-key").read_text().strip()
    c = first.client(key)
    tenant = c.post("/v1/admin/tenants", json={"name": "resume"}).json()["id"]
    iid = c.post("/v1/instances", json={**create_body(replicas=3), "tenant_id": tenant}).json()["id"]
    v1 = wait_state(c, iid, "running")["current_release"]
    dep = c.post(f"/v1/instances/{iid}/deploy", json={"image": V2, "strategy": "rolling"}).json()
    wait_deployment(c, dep["id"], ("running",))
    time.sleep(1.0)
    assert c.get(f"/v1/deployments/{dep['id']}").json()["state"] == "running"  # mid-rollout
    first.stop()
    second = module_mesh_builder(**env)
    c2 = second.client(key)
    done = wait_deployment(c2, dep["id"], ("succeeded", "failed"), timeout=60)
    assert done["state"] == "succeeded", (done["error"], done["progress"])
    inst = c2.get(f"/v1/instances/{iid}").json()
    assert inst["current_release"] == done["release_id"] != v1
    assert {page(e["url"]) for e in inst["endpoints"]} == {"ctrlmesh-test v2"} and len(inst["endpoints"]) == 3
    assert len(engine_containers(docker_host, iid)) == 3
    assert c2.delete(f"/v1/instances/{iid}").status_code == 202
    wait_gone(c2, iid)
    assert engine_containers(docker_host, iid) == []
    second.stop()
