"""The Zectre surface (/api/v1) against the real mesh and the real engine: clusters and nodes read
live from the engine, drain that placement obeys, templates validated and instantiated through
the instances service, managed databases through the databases service, stats and config from
the running settings, with tenant isolation on every id route."""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.fixtures.api import unique
from tests.fixtures.instances import Tenant, create_body, make_tenant, wait_for, wait_state
from tests.fixtures.mesh import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

STATIC, WITH_DB, SCALABLE = (
    "0f6f2a3e-6a0b-4c39-9c11-4c1d7b1e2a01",
    "6c1e9b52-0d7f-4f3a-8a55-2b9e64f0c302",
    "b8a4d0c7-3e21-4d6b-9f08-7a5c2e91d403",
)


def is_uuid(value: Any) -> bool:
    try:
        return str(uuid.UUID(str(value))) == value
    except ValueError:
        return False


def destroy(c: httpx.Client, instance_id: str) -> None:
    """Delete without waiting: the reconciler removes the containers while the next test runs."""
    assert c.delete(f"/v1/instances/{instance_id}").status_code in (202, 404)


def container_env(docker_host: str, instance_id: str) -> dict[str, str]:
    """The environment of the instance's running container (the newest when several run)."""
    import json
    import subprocess

    env = {"DOCKER_HOST": docker_host, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    ids = subprocess.run(
        ["docker", "ps", "--filter", f"label=ctrlmesh.instance={instance_id}", "--format", "{{.ID}}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not ids:
        return {}
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{json .Config.Env}}", ids[0]],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    return dict(e.split("=", 1) for e in json.loads(out or "[]"))


def containers(docker_host: str, instance_id: str) -> list[str]:
    """Ids of the instance's running containers, newest first."""
    import subprocess

    env = {"DOCKER_HOST": docker_host, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(
        ["docker", "ps", "--filter", f"label=ctrlmesh.instance={instance_id}", "--format", "{{.ID}}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def container_mounts(docker_host: str, instance_id: str) -> dict[str, str]:
    """Mount point → host source of the instance's newest running container."""
    import json
    import subprocess

    env = {"DOCKER_HOST": docker_host, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{json .Mounts}}", containers(docker_host, instance_id)[0]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {m["Destination"]: m["Source"] for m in json.loads(out)}


def main_cluster(c: httpx.Client) -> dict[str, Any]:
    r = c.get("/api/v1/clusters")
    assert r.status_code == 200, r.text
    return next(x for x in r.json() if x["name"] == "main")


@pytest.fixture
def tenants(imesh: Mesh) -> tuple[Tenant, Tenant]:
    quota = {"max_instances": 4, "max_cpu_millis": 4000, "max_memory_mb": 4096}
    return make_tenant(imesh, quota), make_tenant(imesh, quota)


def test_clusters_and_nodes_are_plain_arrays_read_live_from_the_engine(imesh: Mesh, tenants: Any) -> None:
    """GET clusters/nodes answer plain arrays of UUID-keyed objects; `main` is the local engine
    shown as one ready node with live counts; unknown ids are 404, malformed ones 400."""
    t, _ = tenants
    c = t.client()
    clusters = c.get("/api/v1/clusters").json()
    assert isinstance(clusters, list) and all(is_uuid(x["id"]) for x in clusters)
    main = main_cluster(c)
    assert main["type"] == "local" and main["description"] is None and main["config"] == {}
    assert main["node_count"] == 1 and main["running_tasks"] >= 0
    assert set(main) >= {
        "id",
        "name",
        "type",
        "config",
        "node_count",
        "running_tasks",
        "created_at",
        "updated_at",
    }
    one = c.get(f"/api/v1/clusters/{main['id']}")
    assert one.status_code == 200 and one.json()["id"] == main["id"]
    nodes = c.get("/api/v1/nodes").json()
    assert isinstance(nodes, list)
    node = next(n for n in nodes if n["cluster_id"] == main["id"])
    assert is_uuid(node["id"]) and node["status"] == "ready" and node["availability"] == "active"
    assert node["cpu"] > 0 and node["memory_mb"] > 0 and node["last_heartbeat_at"]
    assert set(node) >= {"name", "address", "running_tasks", "labels", "created_at", "updated_at"}
    got = c.get(f"/api/v1/nodes/{node['id']}")
    assert got.status_code == 200 and got.json()["id"] == node["id"]
    # The heartbeat moves on its own (polled every few seconds).
    wait_for(
        lambda: c.get(f"/api/v1/nodes/{node['id']}").json()["last_heartbeat_at"],
        lambda hb: hb != node["last_heartbeat_at"],
        timeout=15,
    )
    missing = str(uuid.uuid4())
    assert c.get(f"/api/v1/clusters/{missing}").status_code == 404
    assert c.get(f"/api/v1/nodes/{missing}").status_code == 404
    assert c.get("/api/v1/nodes/not-a-uuid").status_code == 400


def test_cluster_registration_rules(imesh: Mesh, tenants: Any) -> None:
    """POST /api/v1/clusters: global keys only; `managed` is refused with a clear 400; a
    self_managed endpoint that does not answer, or is no swarm manager, is 400 with the reason."""
    t, _ = tenants
    assert t.client().post("/api/v1/clusters", json={"name": "x", "type": "local"}).status_code == 403
    admin = imesh.admin()
    r = admin.post("/api/v1/clusters", json={"name": unique("m"), "type": "managed"})
    assert r.status_code == 400 and "managed" in r.json()["message"]
    r = admin.post(
        "/api/v1/clusters",
        json={
            "name": unique("s"),
            "type": "self_managed",
            "config": {"docker_host": "unix:///nonexistent/docker.sock"},
        },
    )
    assert r.status_code == 400 and "config.docker_host" in r.json()["details"]["fields"], r.text
    r = admin.post("/api/v1/clusters", json={"name": unique("s"), "type": "self_managed"})
    assert r.status_code == 400 and "config.docker_host" in r.json()["details"]["fields"]
    r = admin.post("/api/v1/clusters", json={"name": "main", "type": "local"})
    assert r.status_code == 409


def test_drain_holds_new_instances_in_provisioning_until_undrain(imesh: Mesh, tenants: Any) -> None:
    """With every node of `main` drained, a new instance waits in `provisioning` with the reason,
    an instance already running keeps running, and the new one is placed once undrained; drain
    is admin-only and both changes are audited."""
    t, _ = tenants
    c, admin = t.client(), imesh.admin()
    node = next(n for n in admin.get("/api/v1/nodes").json() if n["cluster_id"] == main_cluster(admin)["id"])
    running = c.post("/v1/instances", json=create_body()).json()
    wait_state(c, running["id"], "running")
    assert c.post(f"/api/v1/nodes/{node['id']}/drain").status_code == 403
    try:
        d = admin.post(f"/api/v1/nodes/{node['id']}/drain")
        assert d.status_code == 200, d.text
        assert d.json()["status"] == "draining" and d.json()["availability"] == "pause"
        held = c.post("/v1/instances", json=create_body())
        assert held.status_code == 201, held.text
        inst = wait_for(
            lambda: c.get(f"/v1/instances/{held.json()['id']}").json(),
            lambda i: "drained" in i["state_reason"],
            timeout=15,
        )
        assert inst["state"] == "provisioning"
        assert c.get(f"/v1/instances/{running['id']}").json()["state"] == "running"
    finally:
        u = admin.post(f"/api/v1/nodes/{node['id']}/undrain")
    assert u.status_code == 200 and u.json()["status"] == "ready" and u.json()["availability"] == "active"
    placed = wait_state(c, held.json()["id"], "running")
    assert placed["state_reason"] == ""
    audit = admin.get("/v1/admin/audit", params={"resource": "node", "limit": 100}).json()["items"]
    actions = {(a["action"], a["resource_id"]) for a in audit}
    assert {("drain", node["id"]), ("undrain", node["id"])} <= actions
    for i in (running, held.json()):
        destroy(c, i["id"])


def test_templates_catalog_and_instantiate(imesh: Mesh, tenants: Any) -> None:
    """The catalog lists at least three templates with JSON Schema parameters; bad parameters are
    400 listing every failing field and create nothing; a good instantiation is 201 with the app
    (rendered from the parameters) and its first deployment; deploy:false makes no deployment."""
    t, _ = tenants
    c = t.client()
    items = c.get("/api/v1/templates").json()
    assert isinstance(items, list) and len(items) >= 3
    assert {STATIC, WITH_DB, SCALABLE} <= {x["id"] for x in items}
    for x in items:
        assert is_uuid(x["id"]) and x["slug"] and x["version"]
        assert x["parameters"]["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    one = c.get(f"/api/v1/templates/{SCALABLE}").json()
    assert one["parameters"]["required"] == ["release"]
    assert c.get(f"/api/v1/templates/{uuid.uuid4()}").status_code == 404

    bad = c.post(
        f"/api/v1/templates/{SCALABLE}/instantiate",
        json={"parameters": {"replicas": 9, "memory_mb": "lots", "color": "red"}},
    )
    assert bad.status_code == 400, bad.text
    fields = bad.json()["details"]["fields"]
    assert set(fields) == {
        "parameters.release",
        "parameters.replicas",
        "parameters.memory_mb",
        "parameters.color",
    }
    assert c.get("/v1/instances").json()["total"] == 0

    name = unique("web").replace("_", "-")
    r = c.post(
        f"/api/v1/templates/{SCALABLE}/instantiate",
        json={"name": name, "parameters": {"release": "v2", "replicas": 2, "greeting": "hi"}},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    app, dep = body["app"], body["deployment"]
    assert body["managed_database"] is None
    assert app["name"] == name and app["image"] == "ctrlmesh-test/httpd:v2" and app["replicas"] == 2
    assert app["env"]["GREETING"] == "hi" and app["labels"]["team"] == "platform"
    assert dep["instance_id"] == app["id"] and dep["state"] in ("pending", "running", "succeeded")

    quiet = c.post(f"/api/v1/templates/{STATIC}/instantiate", json={"deploy": False})
    assert quiet.status_code == 201, quiet.text
    assert quiet.json()["deployment"] is None and quiet.json()["app"]["replicas"] == 0
    wait_for(
        lambda: c.get(f"/v1/deployments/{dep['id']}").json()["state"], lambda s: s == "succeeded", timeout=40
    )
    for i in (app["id"], quiet.json()["app"]["id"]):
        destroy(c, i)


def test_managed_databases_through_the_databases_service(imesh: Mesh, tenants: Any) -> None:
    """A managed database is a serverless database of the caller's tenant: created with the
    mapped name, listed and read with connection_* at the PG Gateway; versions the platform does
    not run are 400 naming the supported ones; another tenant gets 404 on every id route;
    DELETE is 204 and removes the backing database."""
    t, other = tenants
    c = t.client()
    cluster = main_cluster(c)["id"]
    assert (
        c.post("/api/v1/managed-databases", json={"cluster_id": cluster, "name": "x-db", "version": "9"})
        .json()["details"]["fields"]["version"]
        .startswith("supported: ")
    )
    assert (
        c.post(
            "/api/v1/managed-databases", json={"cluster_id": cluster, "name": "x", "engine": "mysql"}
        ).status_code
        == 400
    )
    r = c.post(
        "/api/v1/managed-databases",
        json={"cluster_id": cluster, "name": "my-postgres", "engine": "postgres"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    md = r.json()
    assert is_uuid(md["id"]) and md["cluster_id"] == cluster and md["name"] == "my-postgres"
    assert md["connection_database"] == "my_postgres" and md["status"] in ("creating", "ready")
    assert md["connection_host"] == "localhost" and md["connection_port"] == int(
        imesh.env["CTRLMESH_PG_PORT"]
    )
    assert md["connection_user"] and md["app_id"] is None and md["engine"] == "postgres"
    dbs = c.get(f"/v2/tenants/{t.name}/dbs").json()["items"]
    assert [d["name"] for d in dbs] == ["my_postgres"]
    again = c.post(
        "/api/v1/managed-databases", json={"cluster_id": cluster, "name": "my-postgres"}, timeout=60
    )
    assert again.status_code == 409
    assert c.get("/api/v1/managed-databases").json()[0]["id"] == md["id"]
    assert c.get(f"/api/v1/managed-databases/{md['id']}").json()["status"] == "ready"

    o = other.client()
    assert o.get("/api/v1/managed-databases").json() == []
    for method, path, body in (
        ("GET", f"/api/v1/managed-databases/{md['id']}", None),
        ("DELETE", f"/api/v1/managed-databases/{md['id']}", None),
        ("POST", f"/api/v1/managed-databases/{md['id']}/bind", {"app_id": "inst_01h455vb4pex5vsknk084sn02q"}),
    ):
        assert o.request(method, path, json=body).status_code == 404, path

    assert c.delete(f"/api/v1/managed-databases/{md['id']}").status_code == 204
    assert c.get(f"/api/v1/managed-databases/{md['id']}").status_code == 404
    wait_for(lambda: c.get(f"/v2/tenants/{t.name}/dbs").json()["items"], lambda x: x == [], timeout=30)


def test_stats_and_platform_config(imesh: Mesh, tenants: Any) -> None:
    """Stats count what the key sees (one tenant, its apps and running tasks, the platform's
    nodes); the config reports the running settings (gateway port, ingress, version)."""
    t, other = tenants
    c = t.client()
    inst = c.post("/v1/instances", json=create_body()).json()
    wait_state(c, inst["id"], "running")
    s = c.get("/api/v1/stats").json()
    assert s == {"apps": 1, "deployments": 0, "tasks": 1, "nodes": s["nodes"], "databases": 0, "tenants": 1}
    assert s["nodes"] >= 1
    assert other.client().get("/api/v1/stats").json()["apps"] == 0
    assert imesh.admin().get("/api/v1/stats").json()["tenants"] >= 2
    cfg = c.get("/api/v1/platform/config").json()
    assert cfg["version"] == "0.1.0"
    assert cfg["gateway"] == {
        "host": "localhost",
        "port": int(imesh.env["CTRLMESH_PG_PORT"]),
        "sslmode": "require",
    }
    assert cfg["ingress"] == {
        "domain": "localhost",
        "http_port": int(imesh.env["CTRLMESH_INGRESS_HTTP_PORT"]),
        "https_port": int(imesh.env["CTRLMESH_INGRESS_HTTPS_PORT"]),
    }
    assert cfg["features"]["templates"] is True and cfg["features"]["managed_clusters"] is False
    destroy(c, inst["id"])


def test_bind_writes_the_connection_as_secrets_and_rolls_the_app(
    imesh: Mesh, docker_host: str, tenants: Any
) -> None:
    """Bind sets DATABASE_URL and the PG* variables plus the gateway CA as secrets of the app and
    rolls it, so its new container carries them (a docker app on the local engine: PGHOST names
    the gateway's socket directory, mounted into the container); one app per database
    (409 for a second app); DELETE of a bound database is 409 unless force=true, which unbinds."""
    t, _ = tenants
    c = t.client()
    cluster = main_cluster(c)["id"]
    app = c.post("/v1/instances", json=create_body()).json()
    second = c.post("/v1/instances", json=create_body()).json()
    made = c.post("/api/v1/managed-databases", json={"cluster_id": cluster, "name": "bound-db"}, timeout=60)
    assert made.status_code == 201, made.text
    md = made.json()
    wait_state(c, app["id"], "running")
    r = c.post(f"/api/v1/managed-databases/{md['id']}/bind", json={"app_id": app["id"]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["app_id"] == app["id"]
    keys = {s["key"]: s["type"] for s in c.get(f"/v1/instances/{app['id']}/secrets").json()["items"]}
    assert {"DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE"} <= set(
        keys
    )
    assert keys.get("pg-gateway-ca.crt") == "file" and keys.get("PGSSLROOTCERT") == "env"
    deps = c.get(f"/v1/instances/{app['id']}/deployments").json()["items"]
    assert deps, "binding a running app rolls it"
    wait_for(
        lambda: c.get(f"/v1/deployments/{deps[0]['id']}").json()["state"], lambda s: s == "succeeded", 60
    )
    got = container_env(docker_host, app["id"])
    # A docker app on the local engine reaches the gateway through its mounted Unix socket.
    port = imesh.env["CTRLMESH_PG_PORT"]
    assert got["PGDATABASE"] == "bound_db" and got["PGHOST"] == "/run/ctrlmesh/pg"
    assert got["PGPORT"] == port and got["PGSSLMODE"] == "disable"
    assert got["DATABASE_URL"].startswith(f"postgresql://{md['connection_user']}:")
    assert got["DATABASE_URL"].endswith(f"@/bound_db?host=/run/ctrlmesh/pg&port={port}")
    assert got["PGSSLROOTCERT"] == "/run/secrets/pg-gateway-ca.crt"
    assert container_mounts(docker_host, app["id"])["/run/ctrlmesh/pg"] == str(imesh.data_dir / "pg-socket")

    assert (
        c.post(f"/api/v1/managed-databases/{md['id']}/bind", json={"app_id": second["id"]}).status_code == 409
    )
    assert c.delete(f"/api/v1/managed-databases/{md['id']}").status_code == 409
    assert c.delete(f"/api/v1/managed-databases/{md['id']}", params={"force": "true"}).status_code == 204
    left = {s["key"] for s in c.get(f"/v1/instances/{app['id']}/secrets").json()["items"]}
    assert not left & {"DATABASE_URL", "PGPASSWORD", "pg-gateway-ca.crt"}
    for i in (app, second):
        destroy(c, i["id"])


def test_instantiate_with_database_binds_it_and_a_half_way_failure_leaves_nothing(
    imesh: Mesh, tenants: Any
) -> None:
    """The database template creates the app, a managed database bound to it and the first
    deployment; when a step fails half-way (its database name is taken: 409), the app made
    before it is removed again and no managed database is left."""
    t, other = tenants
    c = t.client()
    r = c.post(
        f"/api/v1/templates/{WITH_DB}/instantiate",
        json={"parameters": {"database_name": "shop-db"}},
        timeout=90,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    md, app = body["managed_database"], body["app"]
    assert md["app_id"] == app["id"] and md["connection_database"] == "shop_db"
    assert body["deployment"]["instance_id"] == app["id"]
    keys = {s["key"] for s in c.get(f"/v1/instances/{app['id']}/secrets").json()["items"]}
    assert {"DATABASE_URL", "PGPASSWORD"} <= keys
    # Another tenant cannot bind to this tenant's app, nor see its database.
    mine = (
        other.client()
        .post(
            "/api/v1/managed-databases", json={"cluster_id": md["cluster_id"], "name": "theirs"}, timeout=60
        )
        .json()
    )
    assert (
        other.client()
        .post(f"/api/v1/managed-databases/{mine['id']}/bind", json={"app_id": app["id"]})
        .status_code
        == 404
    )

    before = {i["id"] for i in c.get("/v1/instances").json()["items"]}
    dup = c.post(
        f"/api/v1/templates/{WITH_DB}/instantiate",
        json={"parameters": {"database_name": "shop-db"}},
        timeout=90,
    )
    assert dup.status_code == 409, dup.text
    wait_for(
        lambda: {
            i["id"] for i in c.get("/v1/instances").json()["items"] if i["state"] not in ("destroying",)
        },
        lambda ids: ids == before,
        timeout=30,
    )
    assert [m["id"] for m in c.get("/api/v1/managed-databases").json()] == [md["id"]]
    assert c.delete(f"/api/v1/managed-databases/{md['id']}", params={"force": "true"}).status_code == 204
    destroy(c, app["id"])


def test_zectre_events_reach_v2_events_and_every_mutation_is_audited(
    imesh: Mesh, docker_host: str, tenants: Any
) -> None:
    """The clusters service's outbox is merged into /v2/events: a global key sees
    cluster.registered, node.drained, node.undrained and node.status_changed; a tenant key sees
    its managed_database.created/.bound/.deleted and template.instantiated, never the platform's
    node or cluster events; each of those mutations is in the audit log. A tenant key naming
    another tenant gets 404, as for a tenant that does not exist."""
    import json
    import threading

    t, other = tenants
    admin = imesh.admin()

    def listen(key: str, want: set[str], out: list[dict[str, Any]]) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.stream("GET", f"{imesh.base_url}/v2/events", headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(json.loads(line[6:]))
                    if want <= {e["type"] for e in out}:
                        return

    platform = {"cluster.registered", "node.drained", "node.undrained"}
    tenant = {
        "managed_database.created",
        "managed_database.bound",
        "managed_database.deleted",
        "template.instantiated",
    }
    seen_admin: list[dict[str, Any]] = []
    seen_tenant: list[dict[str, Any]] = []
    a = threading.Thread(target=listen, args=(imesh.admin_key, platform, seen_admin), daemon=True)
    b = threading.Thread(target=listen, args=(t.key, tenant, seen_tenant), daemon=True)
    a.start()
    b.start()
    time.sleep(3)  # both streams are open and past their heads
    node = next(n for n in admin.get("/api/v1/nodes").json() if n["cluster_id"] == main_cluster(admin)["id"])
    try:
        assert admin.post(f"/api/v1/nodes/{node['id']}/drain").status_code == 200
    finally:
        assert admin.post(f"/api/v1/nodes/{node['id']}/undrain").status_code == 200
    reg = admin.post(
        "/api/v1/clusters",
        json={"name": unique("loc"), "type": "local", "config": {"docker_host": docker_host}},
    )
    assert reg.status_code == 201, reg.text
    c = t.client()
    md = c.post(
        "/api/v1/managed-databases", json={"cluster_id": node["cluster_id"], "name": "evdb"}, timeout=60
    ).json()
    app = c.post("/v1/instances", json=create_body()).json()
    assert c.post(f"/api/v1/managed-databases/{md['id']}/bind", json={"app_id": app["id"]}).status_code == 200
    assert c.delete(f"/api/v1/managed-databases/{md['id']}", params={"force": "true"}).status_code == 204
    made = c.post(f"/api/v1/templates/{STATIC}/instantiate", json={"deploy": False})
    assert made.status_code == 201, made.text
    # Another tenant's id in a body is a tenant that does not exist.
    o = other.client()
    assert (
        o.post(
            "/api/v1/managed-databases",
            json={"cluster_id": node["cluster_id"], "name": "x", "tenant_id": t.id},
        ).status_code
        == 404
    )
    assert o.post(f"/api/v1/templates/{STATIC}/instantiate", json={"tenant_id": t.id}).status_code == 404
    a.join(40)
    b.join(40)
    drained = next(e for e in seen_admin if e["type"] == "node.drained")
    assert drained["resource_id"] == node["id"] and drained["data"]["migrate"] is False
    assert any(e["type"] == "node.status_changed" and e["resource_id"] == node["id"] for e in seen_admin)
    registered = next(e for e in seen_admin if e["type"] == "cluster.registered")
    assert registered["resource_id"] == reg.json()["id"] and registered["tenant_id"] in ("", None)
    by_type = {e["type"]: e for e in seen_tenant}
    assert tenant <= set(by_type), [e["type"] for e in seen_tenant]
    for kind in ("managed_database.created", "managed_database.bound", "managed_database.deleted"):
        assert by_type[kind]["resource_id"] == md["id"] and by_type[kind]["tenant_id"] == t.id
    assert by_type["managed_database.bound"]["data"]["app_id"] == app["id"]
    assert by_type["template.instantiated"]["tenant_id"] == t.id
    assert not any(e["type"].startswith(("node.", "cluster.")) for e in seen_tenant)

    def audited(resource: str) -> set[tuple[str, str]]:
        items = admin.get("/v1/admin/audit", params={"resource": resource, "limit": 100}).json()["items"]
        return {(x["action"], x["resource_id"]) for x in items}

    assert ("create", reg.json()["id"]) in audited("cluster")
    assert {("drain", node["id"]), ("undrain", node["id"])} <= audited("node")
    mds = audited("managed_database")
    assert {("create", md["id"]), ("bind", md["id"]), ("delete", md["id"])} <= mds
    assert ("instantiate", STATIC) in audited("template")
    for i in (app["id"], made.json()["app"]["id"]):
        destroy(c, i)


PG_IMAGE = "ctrlmesh-test/httpd:pg"


def test_bound_app_connects_through_the_gateway_socket_wakes_its_database_and_follows_a_rotation(
    imesh: Mesh, docker_host: str, tenants: Any
) -> None:
    """A bound app's container runs `psql "$DATABASE_URL"` as its health check, through the PG
    Gateway's Unix socket mounted into it (no traffic off the host): the bind's rolling deploy
    passes its health gate only if that works, and it wakes the stopped database. After a
    rotation of the tenant's credentials the app is rolled again, its new container has the
    new password and its check passes with it, while the old password is refused."""
    import subprocess

    t, _ = tenants
    c = t.client()
    cluster = main_cluster(c)["id"]
    app = c.post(
        "/v1/instances", json=create_body(PG_IMAGE, resources={"cpu_millis": 200, "memory_mb": 64})
    ).json()
    md = c.post(
        "/api/v1/managed-databases", json={"cluster_id": cluster, "name": "sock-db"}, timeout=60
    ).json()
    wait_state(c, app["id"], "running")
    db = f"/v2/tenants/{t.name}/dbs/sock_db"
    wait_for(lambda: c.get(db).json()["state"], lambda st: st == "stopped", 30)
    check = c.post(
        f"/v1/instances/{app['id']}/health/checks",
        json={
            "name": "psql",
            "type": "command",
            "target": "psql \"$DATABASE_URL\" -X -A -t -c 'select 40 + 2'",
            "interval": "10s",
            "timeout": "10s",
        },
    )
    assert check.status_code == 201, check.text

    r = c.post(f"/api/v1/managed-databases/{md['id']}/bind", json={"app_id": app["id"]}, timeout=60)
    assert r.status_code == 200, r.text
    first = wait_for(
        lambda: c.get(f"/v1/instances/{app['id']}/deployments").json()["items"], lambda d: len(d) >= 1, 20
    )[0]
    done = wait_for(
        lambda: c.get(f"/v1/deployments/{first['id']}").json(),
        lambda d: d["state"] in ("succeeded", "failed", "rolled_back", "cancelled"),
        60,
    )
    assert done["state"] == "succeeded", done
    run = c.post(f"/v1/health/checks/{check.json()['id']}/run", timeout=30).json()
    assert run["status"] == "healthy" and run["message"] == "42", run
    assert c.get(db).json()["state"] != "stopped"  # the check's connection woke it
    env = container_env(docker_host, app["id"])
    old_password = env["PGPASSWORD"]
    assert env["PGHOST"] == "/run/ctrlmesh/pg"

    rotated = imesh.admin().post(f"/v2/tenants/{t.name}/credentials/rotate")
    assert rotated.status_code == 200, rotated.text
    new_password = rotated.json()["pg_password"]
    assert new_password != old_password
    second = wait_for(
        lambda: c.get(f"/v1/instances/{app['id']}/deployments").json()["items"],
        lambda d: len(d) >= 2,
        30,
    )
    newest = next(d for d in second if d["id"] != first["id"])
    done = wait_for(
        lambda: c.get(f"/v1/deployments/{newest['id']}").json(),
        lambda d: d["state"] in ("succeeded", "failed", "rolled_back", "cancelled"),
        60,
    )
    assert done["state"] == "succeeded", done
    env = container_env(docker_host, app["id"])
    assert env["PGPASSWORD"] == new_password and new_password in env["DATABASE_URL"]
    run = c.post(f"/v1/health/checks/{check.json()['id']}/run", timeout=30).json()
    assert run["status"] == "healthy" and run["message"] == "42", run
    stale = env["DATABASE_URL"].replace(quote(new_password, safe=""), quote(old_password, safe=""))
    refused = subprocess.run(
        ["docker", "exec", containers(docker_host, app["id"])[0], "psql", stale, "-X", "-c", "select 1"],
        env={"DOCKER_HOST": docker_host, "PATH": "/usr/local/bin:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0 and "password authentication failed" in refused.stderr, refused.stderr
    assert c.delete(f"/api/v1/managed-databases/{md['id']}", params={"force": "true"}).status_code == 204
    destroy(c, app["id"])


def test_drain_holds_a_scale_ups_extra_replicas_until_undrain(
    imesh: Mesh, docker_host: str, tenants: Any
) -> None:
    """With every node of `main` drained, scaling a running instance from 1 to 2 replicas places
    no new container: the instance stays running on its one replica with the reason as its
    state_reason; after undrain the extra replica is placed and the reason clears. A scale-down
    is not held; a new deployment waits `pending` (the old release serving) until undrain."""
    from tests.fixtures.docker import engine_containers

    t, _ = tenants
    c, admin = t.client(), imesh.admin()
    node = next(n for n in admin.get("/api/v1/nodes").json() if n["cluster_id"] == main_cluster(admin)["id"])
    inst = c.post("/v1/instances", json=create_body()).json()
    wait_state(c, inst["id"], "running")
    before = containers(docker_host, inst["id"])
    assert len(before) == 1
    try:
        assert admin.post(f"/api/v1/nodes/{node['id']}/drain").status_code == 200
        assert c.post(f"/v1/instances/{inst['id']}/scale", json={"replicas": 2}).status_code == 204
        held = wait_for(
            lambda: c.get(f"/v1/instances/{inst['id']}").json(),
            lambda i: "drained" in i["state_reason"],
            timeout=15,
        )
        assert held["state"] == "running" and held["replicas"] == 2
        time.sleep(2)  # several reconciler passes: none may place the second replica
        assert containers(docker_host, inst["id"]) == before
        assert len(engine_containers(docker_host, inst["id"])) == 1
    finally:
        assert admin.post(f"/api/v1/nodes/{node['id']}/undrain").status_code == 200
    placed = wait_for(
        lambda: c.get(f"/v1/instances/{inst['id']}").json(),
        lambda i: len(i["endpoints"]) == 2 and i["state_reason"] == "",
        timeout=30,
    )
    assert placed["state"] == "running"
    running = containers(docker_host, inst["id"])
    assert len(running) == 2 and before[0] in running  # the first replica kept running throughout
    # Down is never held, drained or not; a deployment (new replicas) waits in `pending`.
    try:
        assert admin.post(f"/api/v1/nodes/{node['id']}/drain").status_code == 200
        assert c.post(f"/v1/instances/{inst['id']}/scale", json={"replicas": 1}).status_code == 204
        wait_for(lambda: len(containers(docker_host, inst["id"])), lambda n: n == 1, timeout=30)
        assert c.get(f"/v1/instances/{inst['id']}").json()["state_reason"] == ""
        serving = containers(docker_host, inst["id"])
        dep = c.post(f"/v1/instances/{inst['id']}/deploy", json={"image": "ctrlmesh-test/httpd:v2"})
        assert dep.status_code == 201, dep.text
        wait_for(
            lambda: c.get(f"/v1/instances/{inst['id']}").json()["state_reason"],
            lambda r: "drained" in r,
            timeout=15,
        )
        time.sleep(2)
        assert c.get(f"/v1/deployments/{dep.json()['id']}").json()["state"] == "pending"
        assert containers(docker_host, inst["id"]) == serving
    finally:
        assert admin.post(f"/api/v1/nodes/{node['id']}/undrain").status_code == 200
    done = wait_for(
        lambda: c.get(f"/v1/deployments/{dep.json()['id']}").json(),
        lambda d: d["state"] in ("succeeded", "failed", "rolled_back", "cancelled"),
        60,
    )
    assert done["state"] == "succeeded", done
    after = c.get(f"/v1/instances/{inst['id']}").json()
    assert after["image"] == "ctrlmesh-test/httpd:v2" and after["state_reason"] == ""
    destroy(c, inst["id"])


def test_instance_create_places_on_a_named_cluster_and_providers_follow_the_registry(
    imesh: Mesh, tenants: Any
) -> None:
    """POST /v1/instances takes a `cluster_id`: the named cluster (here `main`) or, without one,
    the provider's default cluster, shown on the instance; an unknown cluster is 404 and a
    malformed id 400, creating nothing. /v1/admin/providers lists one row per cluster of the
    registry and provider on it, with the instance counts."""
    t, _ = tenants
    c, admin = t.client(), imesh.admin()
    main = main_cluster(c)
    named = c.post("/v1/instances", json=create_body(cluster_id=main["id"]))
    assert named.status_code == 201, named.text
    assert named.json()["cluster_id"] == main["id"]
    unnamed = c.post("/v1/instances", json=create_body()).json()
    assert unnamed["cluster_id"] == main["id"]
    missing = c.post("/v1/instances", json=create_body(cluster_id=str(uuid.uuid4())))
    assert missing.status_code == 404 and "cluster" in missing.json()["message"], missing.text
    assert c.post("/v1/instances", json=create_body(cluster_id="main")).status_code == 400
    assert c.get("/v1/instances").json()["total"] == 2
    wait_state(c, named.json()["id"], "running")

    rows = admin.get("/v1/admin/providers").json()["items"]
    clusters = {x["id"]: x["name"] for x in admin.get("/api/v1/clusters").json()}
    assert {r["cluster_id"] for r in rows} == set(clusters)
    assert all(clusters[r["cluster_id"]] == r["cluster_name"] for r in rows)
    on_main = {r["name"]: r for r in rows if r["cluster_id"] == main["id"]}
    assert set(on_main) == {"docker", "swarm"} and on_main["docker"]["healthy"]
    assert on_main["docker"]["instances"] >= 2
    for i in (named.json(), unnamed):
        destroy(c, i["id"])
