"""Deployments and releases on a real engine: each strategy's observable shape, a failing health
gate, cancel, rollback, and the release bookkeeping (versions, snapshots, current_release)."""

from __future__ import annotations

import pytest

from tests.fixtures.docker import engine_containers
from tests.fixtures.instances import (
    BROKEN,
    V1,
    V2,
    Sampler,
    create_running,
    destroy,
    page,
    wait_deployment,
    wait_for,
)

pytestmark = pytest.mark.e2e

HEALTH = {
    "name": "web",
    "type": "http",
    "target": "http://localhost:8080/healthz",
    "interval": "1s",
    "timeout": "1s",
    "retries": 1,
}


@pytest.fixture
def three(tenant, docker_host):
    """A running 3-replica instance of v1 with an http health check (the deploy gate)."""
    c = tenant.client()
    inst = create_running(c, replicas=3)
    assert c.post(f"/v1/instances/{inst['id']}/health/checks", json=HEALTH).status_code == 201
    yield c, inst
    destroy(c, docker_host, inst["id"])


def serving(c, iid):
    inst = c.get(f"/v1/instances/{iid}").json()
    return inst, {page(e["url"]) for e in inst["endpoints"]}


def deploy(c, iid, image, strategy, **extra):
    r = c.post(f"/v1/instances/{iid}/deploy", json={"image": image, "strategy": strategy, **extra})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize("strategy", ["rolling", "recreate", "blue-green", "canary"])
def test_each_strategy_rolls_out_in_its_own_shape(three, docker_host, strategy):
    """The engine's containers during the rollout: rolling never runs more than N+1 and replaces one
    at a time; recreate never runs old and new together; blue-green runs the whole new set beside
    the old one; canary runs exactly one new replica beside the old set before the rest."""
    c, inst = three
    iid, old = inst["id"], inst["current_release"]
    with Sampler(docker_host, iid) as sampler:
        dep = deploy(c, iid, V2, strategy, notes=f"{strategy} to v2", commit_sha="abc123")
        assert dep["state"] == "pending" and dep["strategy"] == strategy and dep["image"] == V2
        done = wait_deployment(c, dep["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert done["progress"]["ready_replicas"] == 3 and done["progress"]["services"] == {"main": "succeeded"}
    assert done["started_at"] and done["finished_at"]
    new = done["release_id"]
    shapes = [(s.get(old, 0), s.get(new, 0)) for s in sampler.samples]
    totals = [o + n for o, n in shapes]
    if strategy == "rolling":
        assert max(totals) <= 4, shapes
        assert not any(n and o == 0 and n < 3 for o, n in shapes), shapes  # old ones go one at a time
    elif strategy == "recreate":
        assert not any(o and n for o, n in shapes)
    elif strategy == "blue-green":
        assert (3, 3) in shapes and max(totals) == 6
    else:
        assert (3, 1) in shapes and not any(o == 2 and n == 1 for o, n in shapes)
    after, pages = serving(c, iid)
    assert pages == {"ctrlmesh-test v2"} and len(after["endpoints"]) == 3
    assert after["current_release"] == new and after["image"] == V2
    assert len(engine_containers(docker_host, iid)) == 3
    rel = c.get(f"/v1/releases/{new}").json()
    assert rel["version"] == 2 and rel["active"] and rel["image"] == V2 and rel["commit_sha"] == "abc123"
    assert c.get(f"/v1/releases/{old}").json()["active"] is False


def test_failed_health_gate_keeps_the_previous_release_serving(three, docker_host):
    """A release whose replicas never pass the health check fails its deployment; v1 keeps
    serving on all replicas and nothing of the broken release is left on the engine."""
    c, inst = three
    dep = deploy(c, inst["id"], BROKEN, "rolling")
    done = wait_deployment(c, dep["id"], ("succeeded", "failed"))
    assert done["state"] == "failed" and "health gate" in done["error"], done
    assert done["progress"]["services"] == {"main": "failed"}
    after, pages = serving(c, inst["id"])
    assert pages == {"ctrlmesh-test v1"} and after["current_release"] == inst["current_release"]
    assert after["state"] == "running" and len(engine_containers(docker_host, inst["id"])) == 3
    rels = c.get(f"/v1/instances/{inst['id']}/releases").json()
    assert [r["version"] for r in rels["items"]] == [2, 1] and [r["active"] for r in rels["items"]] == [
        False,
        True,
    ]


def test_cancel_stops_the_rollout_and_restores_the_previous_release(three, docker_host):
    """Cancel while the gate waits: 204, the deployment ends `cancelled`, v1 serves on every
    replica again; cancelling a finished deployment is 409."""
    c, inst = three
    dep = deploy(c, inst["id"], BROKEN, "blue-green")
    wait_deployment(c, dep["id"], ("running",))
    r = c.post(f"/v1/deployments/{dep['id']}/cancel")
    assert r.status_code == 204, r.text
    done = wait_deployment(c, dep["id"], ("cancelled", "failed", "succeeded"), timeout=30)
    assert done["state"] == "cancelled" and done["finished_at"]
    _, pages = serving(c, inst["id"])
    assert pages == {"ctrlmesh-test v1"}
    wait_for(lambda: len(engine_containers(docker_host, inst["id"])), lambda n: n == 3)
    r = c.post(f"/v1/deployments/{dep['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"] == "InvalidState"


def test_rollback_redeploys_the_first_release(tenant, docker_host):
    """Deploy v2, then roll back to release 1: a `recreate` deployment pointing at release 1,
    v1 serving again, current_release and the active flag back on release 1, the v2
    deployment marked rolled_back; lists page with a cursor."""
    c = tenant.client()
    inst = create_running(c)
    iid, first = inst["id"], inst["current_release"]
    d2 = deploy(c, iid, V2, "rolling", env={"GREETING": "v2"})
    assert wait_deployment(c, d2["id"], ("succeeded", "failed"))["state"] == "succeeded"
    assert serving(c, iid)[1] == {"ctrlmesh-test v2"}
    r = c.post(f"/v1/instances/{iid}/deploy", json={"image": V2})
    assert r.status_code == 201  # a second release (v3) for paging below
    assert wait_deployment(c, r.json()["id"], ("succeeded", "failed"))["state"] == "succeeded"
    rb = c.post(f"/v1/instances/{iid}/rollback", json={"release_id": first})
    assert rb.status_code == 201, rb.text
    assert rb.json()["strategy"] == "recreate" and rb.json()["release_id"] == first
    done = wait_deployment(c, rb.json()["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    after, pages = serving(c, iid)
    assert (
        pages == {"ctrlmesh-test v1"}
        and after["current_release"] == first
        and after["env"] == {"GREETING": "hello"}
    )
    assert c.get(f"/v1/releases/{first}").json()["active"] is True
    deps = c.get(f"/v1/instances/{iid}/deployments", params={"limit": 2}).json()
    assert deps["total"] == 3 and len(deps["items"]) == 2 and deps["next_cursor"]
    rest = c.get(
        f"/v1/instances/{iid}/deployments", params={"limit": 2, "cursor": deps["next_cursor"]}
    ).json()
    states = {d["id"]: d["state"] for d in deps["items"] + rest["items"]}
    assert sorted(states.values()) == ["rolled_back", "succeeded", "succeeded"]
    rels = c.get(f"/v1/instances/{iid}/releases").json()
    assert [r["version"] for r in rels["items"]] == [3, 2, 1] and rels["items"][1]["env"] == {
        "GREETING": "v2"
    }
    r = c.post(f"/v1/instances/{iid}/rollback", json={"release_id": first})
    assert r.status_code == 409  # already running it
    r = c.post(f"/v1/instances/{iid}/rollback", json={"release_id": "rel_01h455vb4pex5vsknk084sn02q"})
    assert r.status_code == 404
    assert c.get("/v1/releases/rel_01h455vb4pex5vsknk084sn02q").status_code == 404
    assert c.get("/v1/deployments/dep_01h455vb4pex5vsknk084sn02q").status_code == 404
    destroy(c, docker_host, iid)


def test_deploy_rules(tenant, docker_host):
    """Deploys need a running instance, one at a time; unknown strategies are 400."""
    c = tenant.client()
    inst = create_running(c)
    iid = inst["id"]
    assert c.post(f"/v1/instances/{iid}/deploy", json={"image": V1, "strategy": "yolo"}).status_code == 400
    assert c.post(f"/v1/instances/{iid}/deploy", json={}).status_code == 400
    d = deploy(c, iid, V2, "rolling")
    r = c.post(f"/v1/instances/{iid}/deploy", json={"image": V1})
    assert r.status_code == 409 and r.json()["error"] == "InvalidState"
    wait_deployment(c, d["id"], ("succeeded",))
    assert c.post(f"/v1/instances/{iid}/stop").status_code == 204
    wait_for(lambda: c.get(f"/v1/instances/{iid}").json()["state"], lambda s: s == "stopped")
    assert c.post(f"/v1/instances/{iid}/deploy", json={"image": V1}).status_code == 409
    destroy(c, docker_host, iid)
