"""The cross-tenant matrix, generated from the edge's route table: every route with an id in its
path, called with another tenant's key against a real resource of tenant A, answers exactly like
the same call with a random id, and changes nothing of A's.

Nothing here lists routes by hand. `gateway.routes.load_routes()` gives every route the edge
serves; each path variable is mapped to a resource kind by (the literal segment before it, its
name). A route whose variable maps to no kind fails the test, so a new route cannot skip the
matrix, and a tenant-owned kind with no real resource of A's fails it too. A streaming route
(SSE) resolves its resource before any byte, so a foreign one is a 404, exactly like a random id.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from ctrlmesh.common.v1 import common_pb2

from gateway.routes import Route, load_routes
from libs.ids import new_id
from tests.fixtures.api import create_account, unique
from tests.fixtures.docker import engine_containers
from tests.fixtures.instances import (
    V1,
    V2,
    create_running,
    destroy,
    make_tenant,
    wait_deployment,
    wait_for,
)
from tests.fixtures.mesh import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# Every permission flag the contract has (new ones included automatically), so a permission
# check can never stand in for the tenancy check.
ALL_PERMISSIONS = {f.name: True for f in common_pb2.Permissions.DESCRIPTOR.fields}


def _random_name() -> str:
    return unique("nobody")


# (literal segment before the variable, variable name) → resource kind.
KINDS: dict[tuple[str, str], str] = {
    ("tenants", "tenant"): "tenant_name",
    ("dbs", "db"): "db_name",
    ("dbs", "db_id"): "db_uuid",
    ("api-keys", "key_id"): "key_id",
    ("tenants", "id"): "admin_tenant",
    ("instances", "id"): "instance",
    ("deployments", "id"): "deployment",
    ("releases", "id"): "release",
    ("checks", "id"): "health_check",
    ("secrets", "key"): "secret_key",
    ("domains", "id"): "domain",
    ("routes", "id"): "route",
    # Zectre's managed databases are the caller tenant's serverless databases (ROUTES.md).
    ("managed-databases", "id"): "db_uuid",
    # Platform-wide resources (no tenant owns them; PLATFORM_KINDS).
    ("clusters", "id"): "cluster",
    ("nodes", "id"): "node",
    ("templates", "id"): "template",
}

# Kinds no tenant owns: every key reads the same clusters, nodes and templates, and only global
# keys change clusters and nodes (403 before any lookup), so "A's answers like a random id" does
# not apply to them; tests/e2e/test_zectre_api.py covers who may read and change them.
PLATFORM_KINDS = frozenset({"cluster", "node", "template"})

# A well-formed id of each kind that names nothing.
RANDOM: dict[str, Callable[[], str]] = {
    "tenant_name": _random_name,
    "db_name": _random_name,
    "db_uuid": lambda: str(uuid.uuid4()),
    "key_id": lambda: new_id("key"),
    "admin_tenant": lambda: new_id("ten"),
    "instance": lambda: new_id("inst"),
    "deployment": lambda: new_id("dep"),
    "release": lambda: new_id("rel"),
    "health_check": lambda: new_id("chk"),
    "secret_key": lambda: "CANARY_" + secrets.token_hex(4).upper(),
    "domain": lambda: new_id("dom"),
    "route": lambda: new_id("rte"),
    "cluster": lambda: str(uuid.uuid4()),
    "node": lambda: str(uuid.uuid4()),
    "template": lambda: str(uuid.uuid4()),
}

# Request bodies valid enough to get past validation to the lookup (a 400 on both sides would
# prove nothing); `ids` are the ids of the call, so a body may name A's resources too.
BODIES: dict[tuple[str, str], Callable[[dict[str, str]], dict[str, Any]]] = {
    ("POST", "/v2/tenants/{tenant}/dbs"): lambda ids: {"name": unique("x"), "size": "L1"},
    ("POST", "/v2/tenants/{tenant}/dbs/{db}/scale"): lambda ids: {"size": "L2"},
    ("PATCH", "/v1/admin/tenants/{id}"): lambda ids: {"plan": "enterprise"},
    ("POST", "/v1/admin/tenants/{id}/suspend"): lambda ids: {"reason": "cross-tenant"},
    ("PUT", "/v1/admin/tenants/{id}/quota"): lambda ids: {
        "max_instances": 1,
        "max_cpu_millis": 100,
        "max_memory_mb": 64,
        "max_disk_mb": 64,
        "max_domains": 0,
        "max_secrets": 0,
    },
    ("PATCH", "/v1/instances/{id}"): lambda ids: {"labels": {"owned": "by-b"}},
    ("POST", "/v1/instances/{id}/deploy"): lambda ids: {"image": V1, "strategy": "recreate"},
    ("POST", "/v1/instances/{id}/scale"): lambda ids: {"resources": {"cpu_millis": 200, "memory_mb": 64}},
    ("POST", "/v1/instances/{id}/rollback"): lambda ids: {"release_id": ids.get("release", new_id("rel"))},
    ("POST", "/v1/instances/{id}/health/checks"): lambda ids: {
        "name": "b",
        "type": "tcp",
        "target": "localhost:8080",
        "interval": "60s",
        "timeout": "1s",
    },
    ("POST", "/v1/instances/{id}/domains"): lambda ids: {"hostname": "b.example.com"},
    ("POST", "/v1/instances/{id}/routes"): lambda ids: {"path": "/b", "port": 8080},
    ("PATCH", "/v1/routes/{id}"): lambda ids: {"weight": 1},
    ("POST", "/v1/instances/{id}/secrets"): lambda ids: {"key": "B_SECRET", "value": "b"},
    ("POST", "/api/v1/managed-databases/{id}/bind"): lambda ids: {
        "app_id": ids.get("instance", new_id("inst"))
    },
    ("POST", "/api/v1/templates/{id}/instantiate"): lambda ids: {"name": "b", "deploy": False},
}

# Query parameters that make a call as destructive as it can be.
PARAMS: dict[tuple[str, str], dict[str, str]] = {
    ("DELETE", "/v2/tenants/{tenant}"): {"cascade": "true"},
    ("DELETE", "/v2/tenants/{tenant}/dbs/{db}"): {"force": "true"},
}

# Answers that show the lookup was reached: not found, or refused for the key's kind/permission,
# or not implemented yet. A 400 means the body above did not get past validation.
LOOKUP_STATUSES = {403, 404, 501}

_SEGMENT_VAR = re.compile(r"([^/{}]+)/\{([a-zA-Z_][a-zA-Z0-9_.]*)\}")


def path_kinds(route: Route) -> list[tuple[str, str]]:
    """(variable, kind) for each path variable, in order; fails on a variable with no kind."""
    found = _SEGMENT_VAR.findall(route.template)
    assert len(found) == len(route.path_fields), f"{route.template}: a variable not after a literal segment"
    out = []
    for segment, var in found:
        kind = KINDS.get((segment, var))
        if kind is None:
            pytest.fail(
                f"{route.http_method} {route.template}: no resource kind for {{{var}}} after "
                f"'{segment}/'; add it to KINDS (and a builder for tenant A) so the route is in the matrix"
            )
        out.append((var, kind))
    return out


def id_routes() -> list[Route]:
    return [r for r in load_routes() if r.path_fields]


@dataclass
class Victim:
    """Tenant A's real resources, by kind; `None` for a kind nothing can build yet."""

    mesh: Mesh
    key: str
    ids: dict[str, str | None]
    snapshots: list[tuple[str, str]] = field(default_factory=list)  # (key kind, path)
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        """Everything of A's, read with A's key (and the admin key for the admin view)."""
        out: dict[str, Any] = {}
        if not self.clients:
            self.clients = {"own": self.mesh.client(self.key), "admin": self.mesh.admin()}
        for who, path in self.snapshots:
            r = self.clients[who].get(path)
            out[path] = (r.status_code, _stable(r.json()))
        return out


# Fields the platform itself moves while nothing is done to the resource.
VOLATILE = {"last_checked", "last_result", "uptime_percent", "consecutive_failures", "status_checked_at"}


def _stable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _stable(x) for k, x in v.items() if k not in VOLATILE}
    if isinstance(v, list):
        return [_stable(x) for x in v]
    return v


@pytest.fixture(scope="module")
def victim(imesh: Mesh, docker_host: str) -> Iterator[Victim]:
    """Tenant A with one of everything that exists: an SPG99 database and key, a Ctrl Plane
    tenant, an instance with two releases from a deployment, a health check, a secret, a domain
    and a route, and a Zectre managed database."""
    a = make_tenant(imesh)
    c = a.client()
    # A Zectre managed database: A's serverless database `appdb`, under the same UUID.
    main = next(x for x in c.get("/api/v1/clusters").json() if x["name"] == "main")
    r = c.post("/api/v1/managed-databases", json={"cluster_id": main["id"], "name": "appdb"}, timeout=60)
    assert r.status_code == 201, r.text
    db = c.get(f"/v2/dbs/{r.json()['id']}").json()
    inst = create_running(c, image=V1)
    dep = c.post(f"/v1/instances/{inst['id']}/deploy", json={"image": V2, "strategy": "recreate"})
    assert dep.status_code in (200, 201, 202), dep.text
    wait_deployment(c, dep.json()["id"], ("succeeded",))
    releases = c.get(f"/v1/instances/{inst['id']}/releases").json()["items"]
    assert len(releases) == 2
    chk = c.post(
        f"/v1/instances/{inst['id']}/health/checks",
        json={"name": "a", "type": "tcp", "target": "localhost:8080", "interval": "60s", "timeout": "1s"},
    )
    assert chk.status_code == 201, chk.text
    sec = c.post(f"/v1/instances/{inst['id']}/secrets", json={"key": "A_SECRET", "value": "of-tenant-a"})
    assert sec.status_code == 201, sec.text
    dom = c.post(
        f"/v1/instances/{inst['id']}/domains", json={"hostname": f"a-{uuid.uuid4().hex[:12]}.example.com"}
    )
    assert dom.status_code == 201, dom.text
    rte = c.post(f"/v1/instances/{inst['id']}/routes", json={"path": "/a", "port": 8080})
    assert rte.status_code == 201, rte.text
    key_id = c.get("/v2/api-keys/me").json()["id"]
    ids: dict[str, str | None] = {
        "tenant_name": a.name,
        "db_name": db["name"],
        "db_uuid": db["db_id"],
        "key_id": key_id,
        "admin_tenant": a.id,
        "instance": inst["id"],
        "deployment": dep.json()["id"],
        "release": releases[-1]["id"],
        "health_check": chk.json()["id"],
        "secret_key": "A_SECRET",
        "domain": dom.json()["id"],
        "route": rte.json()["id"],
        # Zectre's platform kinds are no tenant's (PLATFORM_KINDS).
        "cluster": None,
        "node": None,
        "template": None,
    }
    v = Victim(imesh, a.key, ids)
    i = inst["id"]
    v.snapshots = [
        ("own", f"/v2/tenants/{a.name}"),
        ("own", f"/v2/tenants/{a.name}/credentials"),
        ("own", f"/v2/tenants/{a.name}/dbs/{db['name']}"),
        ("own", f"/v2/tenants/{a.name}/dbs"),
        ("own", f"/api/v1/managed-databases/{db['db_id']}"),
        ("own", "/v2/api-keys/me"),
        ("admin", f"/v1/admin/tenants/{a.id}"),
        ("admin", f"/v1/admin/tenants/{a.id}/quota"),
        ("own", f"/v1/instances/{i}"),
        ("own", f"/v1/instances/{i}/deployments"),
        ("own", f"/v1/instances/{i}/releases"),
        ("own", f"/v1/instances/{i}/health/checks"),
        ("own", f"/v1/instances/{i}/secrets"),
        ("own", f"/v1/instances/{i}/domains"),
        ("own", f"/v1/instances/{i}/routes"),
        ("own", f"/v1/deployments/{ids['deployment']}"),
    ]
    # The database settles (creating → stopped) before the first snapshot.
    wait_for(lambda: c.get(f"/v2/dbs/{db['db_id']}").json()["state"], lambda s: s != "creating", 30)
    yield v
    destroy(c, docker_host, i)


@pytest.fixture(scope="module")
def attackers(imesh: Mesh, victim: Victim) -> dict[str, str]:
    """Keys that must see nothing of A's: a tenant key of a sibling tenant in A's own account,
    and another account's account key and tenant key. Every permission, so a permission check
    cannot stand in for the tenancy check."""
    admin = imesh.admin()
    sibling = make_tenant(imesh)
    _, other_account_key = create_account(imesh)
    oc = imesh.client(other_account_key)
    other = unique("b")
    assert oc.post("/v2/tenants", json={"name": other}).status_code == 201
    other_tenant_key = oc.post(
        "/v2/api-keys", json={"name": "b", "scope": "tenant", "tenant": other, "permissions": ALL_PERMISSIONS}
    )
    assert other_tenant_key.status_code == 201, other_tenant_key.text
    sib_key = admin.post(
        "/v2/api-keys",
        json={"name": "c", "scope": "tenant", "tenant": sibling.name, "permissions": ALL_PERMISSIONS},
    )
    assert sib_key.status_code == 201, sib_key.text
    return {
        "sibling tenant key": sib_key.json()["key"],
        "other account's key": other_account_key,
        "other account's tenant key": other_tenant_key.json()["key"],
    }


def _call(c: httpx.Client, route: Route, path: str, ids: dict[str, str]) -> tuple[int, str]:
    key = (route.http_method, route.template)
    body = BODIES.get(key, lambda _: {})(ids) if route.http_method in ("POST", "PUT", "PATCH") else None
    params = PARAMS.get(key)
    if route.streaming:
        # An SSE route: the status and what it sends in its first second (a leak would stream A's data).
        chunks: list[str] = []
        try:
            with c.stream("GET", path, params=params, timeout=httpx.Timeout(5, read=1.5)) as r:
                status = r.status_code
                for chunk in r.iter_text():
                    chunks.append(chunk)
                    if sum(map(len, chunks)) > 4096:
                        break
        except httpx.ReadTimeout:
            pass
        return status, "".join(chunks)
    r = c.request(route.http_method, path, json=body, params=params)
    return r.status_code, r.text


def _fill(route: Route, values: dict[str, str]) -> str:
    path = route.template
    for var in route.path_fields:
        path = path.replace("{" + var + "}", values[var])
    return path


def _normalise(text: str, mapping: dict[str, str]) -> Any:
    for theirs, placeholder in mapping.items():
        text = text.replace(theirs, placeholder)
    try:
        return json.loads(text)
    except ValueError:
        return text


def test_every_id_route_maps_to_a_resource_kind():
    """Every path variable of every route has a kind, so nothing skips the matrix."""
    routes = id_routes()
    assert len(routes) > 50
    for r in routes:
        path_kinds(r)


def test_foreign_resources_answer_like_random_ids_and_stay_unchanged(imesh, victim, attackers):
    """For every id route and every foreign key: the call on A's real resource gets the same
    status and body (modulo the id) as on a random id, the status shows the lookup was reached,
    and A's resources read the same after each key's calls as before."""
    before = victim.snapshot()
    failures: list[str] = []
    checked = 0
    for label, key in attackers.items():
        c = imesh.client(key)
        for route in id_routes():
            kinds = path_kinds(route)
            if {kind for _, kind in kinds} <= PLATFORM_KINDS:
                continue
            random_ids = {kind: RANDOM[kind]() for _, kind in kinds}
            real = {kind: victim.ids[kind] for _, kind in kinds}
            buildable = all(v is not None for v in real.values())
            theirs_ids = {k: (v if v is not None else RANDOM[k]()) for k, v in real.items()}
            theirs_path = _fill(route, {var: theirs_ids[kind] for var, kind in kinds})
            nothing_path = _fill(route, {var: random_ids[kind] for var, kind in kinds})
            t_status, t_body = _call(c, route, theirs_path, {**victim.ids, **theirs_ids})  # type: ignore[dict-item]
            n_status, n_body = _call(c, route, nothing_path, random_ids)
            checked += 1
            where = f"[{label}] {route.http_method} {route.template}"
            placeholders = {v: f"<{k}>" for k, v in theirs_ids.items()}
            placeholders.update({v: f"<{k}>" for k, v in random_ids.items()})
            if t_status != n_status or _normalise(t_body, placeholders) != _normalise(n_body, placeholders):
                failures.append(
                    f"{where}: A's → {t_status} {t_body[:300]!r}; random → {n_status} {n_body[:300]!r}"
                )
            if not buildable:
                failures.append(
                    f"{where}: no real {[k for k, v in real.items() if v is None]} of tenant A: "
                    "build one in the victim fixture"
                )
            if route.streaming and t_status != 404:
                # A stream resolves the resource first: a foreign one is 404 before any SSE byte.
                failures.append(f"{where}: a stream of A's resource answered {t_status} {t_body[:300]!r}")
            elif t_status not in LOOKUP_STATUSES:
                failures.append(
                    f"{where}: {t_status} {t_body[:200]!r} does not show the lookup was reached; "
                    "give the route a valid body in BODIES"
                )
        # Once per key (a snapshot after every mutation would triple the test's time): what
        # changed names the resource, and so the few routes that could have changed it.
        after = victim.snapshot()
        if after != before:
            changed = [p for p in before if before[p] != after.get(p)]
            failures.append(f"[{label}]'s calls changed A's {changed}")
            before = after
    assert checked >= 3 * 50
    assert not failures, "\n".join(failures)
    # A's instance still runs on the engine, exactly once.
    assert len(engine_containers(imesh.env["DOCKER_HOST"], victim.ids["instance"])) == 1  # type: ignore[arg-type]
