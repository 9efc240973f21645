"""Instances through the edge on a real Docker engine: create with the seed's body, the state
machine and every lifecycle action, scoping, quotas, suspension, telemetry, convergent delete."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

from tests.fixtures.api import unique
from tests.fixtures.docker import engine_containers
from tests.fixtures.instances import (
    V1,
    create_body,
    create_running,
    destroy,
    make_tenant,
    page,
    wait_for,
    wait_gone,
    wait_state,
)

pytestmark = pytest.mark.e2e


def test_create_answers_at_once_then_runs_on_its_endpoint(imesh, docker_host):
    """The seed's curl body with a global key: 201 provisioning at once, then running, with an
    endpoint on 127.0.0.1 that serves the image, the env given, limits and labels on the engine."""
    t = make_tenant(imesh)
    admin = imesh.admin()
    r = admin.post("/v1/instances", json={**create_body(), "tenant_id": t.id})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("inst_") and body["tenant_id"] == t.id
    assert body["state"] == "provisioning" and body["provider_name"] == "docker"
    assert body["resources"] == {"cpu_millis": 100, "memory_mb": 32, "disk_mb": 0}
    assert body["env"] == {"GREETING": "hello"} and body["labels"] == {"team": "platform"}
    assert body["current_release"].startswith("rel_")
    inst = wait_state(admin, body["id"], "running")
    [ep] = inst["endpoints"]
    assert ep["url"].startswith("http://127.0.0.1:") and inst["ports"][0]["host_port"] == ep["port"]
    assert page(ep["url"]) == "ctrlmesh-test v1"
    assert httpx.get(ep["url"] + "/env.txt").text.strip() == "hello"
    [name] = engine_containers(docker_host, body["id"])
    import subprocess

    info = json.loads(
        subprocess.run(
            ["docker", "inspect", name],
            capture_output=True,
            text=True,
            check=True,
            env={"DOCKER_HOST": docker_host, "PATH": "/usr/local/bin:/usr/bin:/bin"},
        ).stdout
    )[0]
    assert info["HostConfig"]["NanoCpus"] == 100_000_000 and info["HostConfig"]["Memory"] == 32 * 1024 * 1024
    assert info["Config"]["Labels"]["ctrlmesh.instance"] == body["id"]
    assert info["Config"]["Labels"]["user.team"] == "platform"
    assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    destroy(admin, docker_host, body["id"])


def test_tenant_keys_create_in_their_own_tenant_and_see_nothing_else(imesh, docker_host):
    """A tenant key needs no tenant_id; another tenant's instance is 404 with the same body as a
    random id on every route; a global key without tenant_id is 400."""
    a, b = make_tenant(imesh), make_tenant(imesh)
    ca, cb = a.client(), b.client()
    inst = create_running(ca)
    assert inst["tenant_id"] == a.id
    missing = "inst_01h455vb4pex5vsknk084sn02q"
    for method, suffix in (
        ("GET", ""),
        ("PATCH", ""),
        ("POST", "/stop"),
        ("POST", "/start"),
        ("DELETE", ""),
        ("GET", "/health"),
        ("GET", "/releases"),
        ("POST", "/deploy"),
        ("GET", "/logs"),
    ):
        body = (
            {"image": V1} if suffix == "/deploy" else ({} if method != "GET" and method != "DELETE" else None)
        )
        theirs = cb.request(method, f"/v1/instances/{inst['id']}{suffix}", json=body)
        nothing = cb.request(method, f"/v1/instances/{missing}{suffix}", json=body)
        assert theirs.status_code == nothing.status_code == 404, (method, suffix, theirs.text)
        assert theirs.json()["message"].replace(inst["id"], missing) == nothing.json()["message"]
    assert cb.get("/v1/instances").json()["total"] == 0
    assert ca.get(f"/v1/instances/{inst['id']}").json()["state"] == "running"
    r = imesh.admin().post("/v1/instances", json=create_body())
    assert r.status_code == 400 and r.json()["details"]["fields"]["tenant_id"]
    r = ca.post("/v1/instances", json={**create_body(), "tenant_id": b.id})
    assert r.status_code == 404
    destroy(ca, docker_host, inst["id"])


def test_create_validation_and_unknown_provider(imesh, tenant):
    """Bad bodies are 400 with the failing fields; an unknown provider is 400, not 500."""
    c = tenant.client()
    r = c.post("/v1/instances", json={"name": "x"})
    assert r.status_code == 400 and r.json()["error"] == "BadRequest"
    r = c.post("/v1/instances", json=create_body(provider_name="nomad"))
    assert r.status_code == 400 and "provider_name" in r.json()["details"]["fields"]
    r = c.post("/v1/instances", json=create_body(resources={"cpu_millis": -1}))
    assert r.status_code == 400


def test_list_filters_and_cursor(imesh, docker_host):
    """List pages with a stable cursor and filters by state, label and provider."""
    t = make_tenant(imesh)
    c = t.client()
    ids = [
        c.post("/v1/instances", json=create_body(labels={"tier": "a" if i < 2 else "b"})).json()["id"]
        for i in range(3)
    ]
    for i in ids:
        wait_state(c, i, "running")
    first = c.get("/v1/instances", params={"limit": 2}).json()
    assert first["total"] == 3 and len(first["items"]) == 2 and first["next_cursor"]
    second = c.get("/v1/instances", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert len(second["items"]) == 1 and second["next_cursor"] == ""
    assert [x["id"] for x in first["items"] + second["items"]] == sorted(ids, reverse=True)
    assert c.get("/v1/instances", params={"label": "tier=a"}).json()["total"] == 2
    assert c.get("/v1/instances", params={"provider": "swarm"}).json()["total"] == 0
    assert c.get("/v1/instances", params={"state": "running", "provider": "docker"}).json()["total"] == 3
    assert c.get("/v1/instances", params={"cursor": "junk"}).status_code == 400
    r = c.patch(f"/v1/instances/{ids[0]}", json={"name": "Renamed App", "labels": {"tier": "c"}})
    assert r.status_code == 200 and r.json()["name"] == "Renamed App" and r.json()["slug"] == "renamed-app"
    assert r.json()["labels"] == {"tier": "c"}
    for i in ids:
        destroy(c, docker_host, i)


def test_lifecycle_actions_follow_the_state_machine(imesh, running_instance, docker_host):
    """stop/start/restart/scale/suspend/unsuspend answer 204 and show on the engine; actions not
    allowed in the current state are 409 InvalidState."""
    tenant, inst = running_instance
    c = tenant.client()
    iid = inst["id"]
    r = c.post(f"/v1/instances/{iid}/start")
    assert r.status_code == 409 and r.json()["error"] == "InvalidState"
    assert c.post(f"/v1/instances/{iid}/stop").status_code == 204
    assert c.get(f"/v1/instances/{iid}").json()["state"] in ("stopping", "stopped")
    stopped = wait_state(c, iid, "stopped")
    assert stopped["endpoints"] == []
    assert c.post(f"/v1/instances/{iid}/stop").json()["error"] == "InvalidState"
    assert c.post(f"/v1/instances/{iid}/start").status_code == 204
    running = wait_state(c, iid, "running")
    assert page(running["endpoints"][0]["url"]) == "ctrlmesh-test v1"
    assert c.post(f"/v1/instances/{iid}/restart").status_code == 204
    wait_state(c, iid, "running")
    # Scale: resources and replicas, applied on the engine.
    r = c.post(
        f"/v1/instances/{iid}/scale", json={"resources": {"cpu_millis": 200, "memory_mb": 48}, "replicas": 2}
    )
    assert r.status_code == 204, r.text
    scaled = wait_for(lambda: c.get(f"/v1/instances/{iid}").json(), lambda i: len(i["endpoints"]) == 2)
    assert scaled["replicas"] == 2 and scaled["resources"]["cpu_millis"] == 200
    assert len(engine_containers(docker_host, iid)) == 2
    assert {page(e["url"]) for e in scaled["endpoints"]} == {"ctrlmesh-test v1"}
    assert c.post(f"/v1/instances/{iid}/scale", json={}).status_code == 400
    # Suspend: stopped with suspended_at; every other action refused until unsuspend.
    assert c.post(f"/v1/instances/{iid}/suspend", json={"reason": "payment overdue"}).status_code == 204
    sus = wait_state(c, iid, "stopped")
    assert sus["suspended_at"] and sus["suspend_reason"] == "payment overdue"
    for action in ("start", "restart", "stop", "suspend"):
        assert c.post(f"/v1/instances/{iid}/{action}", json={}).status_code == 409, action
    assert c.post(f"/v1/instances/{iid}/scale", json={"replicas": 1}).status_code == 409
    assert c.post(f"/v1/instances/{iid}/unsuspend", json={"reason": "paid"}).status_code == 204
    back = wait_state(c, iid, "running")
    assert back["suspended_at"] is None and len(back["endpoints"]) == 2
    assert c.post(f"/v1/instances/{iid}/unsuspend", json={}).status_code == 409


def test_delete_is_convergent_and_leaves_no_container(imesh, tenant, docker_host):
    """DELETE answers 202 with `destroying`, then the row and every container are gone, also
    for an instance deleted while still provisioning."""
    c = tenant.client()
    r = c.post("/v1/instances", json=create_body(replicas=2))
    iid = r.json()["id"]
    d = c.delete(f"/v1/instances/{iid}")  # at once: the row is half built
    assert d.status_code == 202 and d.json()["state"] == "destroying"
    wait_gone(c, iid)
    assert engine_containers(docker_host, iid) == []
    assert c.delete(f"/v1/instances/{iid}").status_code == 404


def test_quota_refuses_creates_and_scales_with_429_even_when_racing(imesh, docker_host):
    """max_instances, CPU and memory quotas: 429 QuotaExceeded on create and scale; four
    concurrent creates against a quota of two make exactly two instances."""
    t = make_tenant(imesh, {"max_instances": 2, "max_cpu_millis": 400, "max_memory_mb": 256})
    c = t.client()

    def create(_: int) -> httpx.Response:
        with t.client() as own:
            return own.post("/v1/instances", json=create_body())

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(create, range(4)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 201, 429, 429], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 429).json()
    assert refused["error"] == "QuotaExceeded" and refused["details"]["quota"] == "max_instances"
    made = [a.json()["id"] for a in answers if a.status_code == 201]
    for i in made:
        wait_state(c, i, "running")
    r = c.post(f"/v1/instances/{made[0]}/scale", json={"resources": {"cpu_millis": 350}})
    assert r.status_code == 429 and r.json()["details"]["quota"] == "max_cpu_millis"
    r = c.post(f"/v1/instances/{made[0]}/scale", json={"replicas": 4, "resources": {"memory_mb": 64}})
    assert r.status_code == 429
    assert (
        c.post(f"/v1/instances/{made[0]}/scale", json={"resources": {"cpu_millis": 300}}).status_code == 204
    )
    quota = imesh.admin().get(f"/v1/admin/tenants/{t.id}/quota").json()
    assert quota["used"]["instances"] == 2 and quota["used"]["cpu_millis"] == 400
    for i in made:
        destroy(c, docker_host, i)


def test_suspended_tenant_is_stopped_and_read_only(imesh, docker_host):
    """Suspending the tenant (accounts) stops its instances; its key's writes are 403 while reads
    work; after unsuspend the instance stays stopped until started."""
    t = make_tenant(imesh)
    c, admin = t.client(), imesh.admin()
    inst = create_running(c)
    assert admin.post(f"/v1/admin/tenants/{t.id}/suspend", json={"reason": "abuse"}).status_code == 204
    wait_state(c, inst["id"], "stopped", timeout=20)
    assert c.get(f"/v1/instances/{inst['id']}").status_code == 200
    for method, path, body in (
        ("POST", "/v1/instances", create_body()),
        ("POST", f"/v1/instances/{inst['id']}/start", {}),
        ("POST", f"/v1/instances/{inst['id']}/deploy", {"image": V1}),
    ):
        r = c.request(method, path, json=body)
        assert r.status_code == 403 and r.json()["error"] == "Forbidden", (path, r.text)
    assert admin.post(f"/v1/admin/tenants/{t.id}/unsuspend", json={}).status_code == 204
    assert c.get(f"/v1/instances/{inst['id']}").json()["state"] == "stopped"
    assert c.post(f"/v1/instances/{inst['id']}/start").status_code == 204
    wait_state(c, inst["id"], "running")
    destroy(c, docker_host, inst["id"])


def test_telemetry_from_the_engine(imesh, running_instance):
    """Resources and logs come from docker stats/logs, also as SSE; the dashboard combines them;
    an instance that exported nothing has no metrics or traces and null request figures
    (tests/e2e/test_instances_telemetry.py exports some)."""
    tenant, inst = running_instance
    c = tenant.client()
    page(inst["endpoints"][0]["url"])  # one request, so httpd logs a line
    res = c.get(f"/v1/instances/{inst['id']}/resources")
    assert res.status_code == 200, res.text
    assert res.json()["memory_limit_mb"] == 32 and res.json()["memory_used_mb"] >= 0
    logs = wait_for(
        lambda: c.get(f"/v1/instances/{inst['id']}/logs", params={"limit": 50}).json(),
        lambda b: any("response:200" in e["message"] for e in b["items"]),
    )
    first = logs["items"][0]
    assert first["message"] == "serving on 8080" and first["source"] == "stdout" and first["level"] == "info"
    assert {e["source"] for e in logs["items"]} == {"stdout", "stderr"}
    assert c.get(f"/v1/instances/{inst['id']}/logs", params={"level": "error"}).json()["items"] == []
    with c.stream(
        "GET", f"/v1/instances/{inst['id']}/logs/stream", params={"tail": 1, "follow": "false"}
    ) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        text = "".join(s.iter_text())
    assert "data: " in text and "instance_id" in text
    # Another tenant's instance: the same plain 404 as a random id, before any SSE byte.
    other = make_tenant(imesh).client()
    for suffix in ("logs/stream", "health/stream"):
        with other.stream("GET", f"/v1/instances/{inst['id']}/{suffix}") as s:
            s.read()
        assert s.status_code == 404 and s.headers["content-type"] == "application/json", suffix
    with c.stream("GET", f"/v1/instances/{inst['id']}/health/stream", timeout=5) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
    dash = c.get(f"/v1/instances/{inst['id']}/dashboard").json()
    assert dash["resources"]["memory_limit_mb"] == 32 and dash["health_status"] == "unknown"
    assert dash["request_rate_per_sec"] is None and dash["p99_latency"] is None
    for route in ("metrics", "traces"):
        r = c.get(f"/v1/instances/{inst['id']}/{route}")
        assert r.status_code == 200 and r.json()["items"] == [] and r.json()["total"] == 0, route


def test_admin_providers_and_stats(imesh, tenant):
    """/v1/admin/providers lists docker and swarm with live health and capabilities (global keys
    only); platform stats count providers and instances."""
    r = imesh.admin().get("/v1/admin/providers")
    assert r.status_code == 200
    items = {p["name"]: p for p in r.json()["items"]}
    assert set(items) == {"docker", "swarm"} and all(p["healthy"] for p in items.values())
    assert "strategy:canary" in items["docker"]["capabilities"]
    assert tenant.client().get("/v1/admin/providers").status_code == 403
    stats = imesh.admin().get("/v1/admin/stats").json()
    assert stats["total_providers"] == 2 and stats["healthy_providers"] == 2
    assert unique()  # keeps the helper import honest
