"""Per-request budgets: what one request through the edge costs the service that serves it, in
PostgreSQL round trips and calls to other services, read from that service's /metrics
(`ctrlmesh_rpc_sql_statements`, `ctrlmesh_rpc_peer_calls`: libs/budget.py), like Django's
assertNumQueries. A budget is the most any single request of the family may cost: one statement
more fails the test. The hot paths make no call to another service once warm: the tenant comes
from the caller's cache (libs.peers.TenantCache), the principal from the edge's.

Then what that cache may and may not hide: writes ask accounts, so a suspension refuses the
next write at once; a cached read sees a deleted tenant within CTRLMESH_TENANT_CACHE_TTL (in
practice at once: accounts' events invalidate the cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.embedded_pg import EmbeddedPostgres
from libs.settings import Settings
from tests.fixtures.api import create_account, unique
from tests.fixtures.mesh import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SQL = "ctrlmesh_rpc_sql_statements"
PEER = "ctrlmesh_rpc_peer_calls"
REQUESTS = 5


@dataclass(frozen=True)
class Budget:
    """A route family: the RPC behind it, and the most one request may cost there."""

    route: str
    service: str
    method: str
    sql: int
    peer: int
    # The gRPC service of the method where the process serves two of that name (accounts has
    # TenantService.GetTenant and AdminService.GetTenant: their series must not be mixed up).
    grpc_service: str = ""


# Measured on the mesh (2026-12-02) and set to exactly that: a GET is its one SELECT (no
# BEGIN/COMMIT, the tenant from the cache); a list adds its count; a mutation is its transaction
# (BEGIN ... COMMIT), its audit record (accounts writes its own: one INSERT; other services send
# one RecordAudit) and, outside accounts, a fresh ResolveTenant (writes never trust the cache).
BUDGETS = {
    "get_db_by_id": Budget("GET /v2/dbs/{id}", "databases", "GetDatabaseById", 1, 0),
    "get_db_by_name": Budget("GET /v2/tenants/{t}/dbs/{name}", "databases", "GetDatabase", 1, 0),
    "list_dbs": Budget("GET /v2/tenants/{t}/dbs", "databases", "ListDatabases", 2, 0),
    # db_count comes from the databases service: one CountTenantResources.
    "get_tenant": Budget("GET /v2/tenants/{t}", "accounts", "GetTenant", 1, 1, "TenantService"),
    "contact": Budget("POST /v2/account/contact", "accounts", "UpdateContact", 5, 0),
    "get_instance": Budget("GET /v1/instances/{id}", "instances", "GetInstance", 1, 0),
    "list_instances": Budget("GET /v1/instances", "instances", "ListInstances", 2, 0),
    # The storage is prepared while the create is served: the lifecycle's steps and the role's
    # verifier (LookupPgCredentials); the plan's limits are asked fresh (GetTenantLimits).
    "create_db": Budget("POST /v2/tenants/{t}/dbs", "databases", "CreateDatabase", 20, 4),
    "delete_db": Budget("DELETE /v2/tenants/{t}/dbs/{name}", "databases", "DeleteDatabase", 8, 2),
}


def metrics_url(mesh: Mesh, service: str) -> str:
    port = int(mesh.env[f"CTRLMESH_{service.upper()}_PORT"]) + int(mesh.env["CTRLMESH_METRICS_PORT_OFFSET"])
    return f"http://127.0.0.1:{port}/metrics"


def histogram(mesh: Mesh, name: str, b: Budget) -> dict[str, float]:
    """The cumulative buckets (le -> count) and `count` of one method's histogram."""
    out: dict[str, float] = {"count": 0.0}
    text = httpx.get(metrics_url(mesh, b.service), timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.labels.get("method") != b.method:
                continue
            if b.grpc_service and not s.labels.get("service", "").endswith("." + b.grpc_service):
                continue
            if s.name.endswith("_bucket"):
                out[s.labels["le"]] = s.value
            elif s.name.endswith("_count"):
                out["count"] = s.value
    return out


def auth_calls(mesh: Mesh) -> float:
    text = httpx.get(metrics_url(mesh, "accounts"), timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "ctrlmesh_grpc_server_requests":
            return sum(s.value for s in family.samples if s.labels.get("method") == "Authenticate")
    return 0.0


def worst(before: dict[str, float], after: dict[str, float]) -> int:
    """The most any one of the new observations cost (from the buckets' deltas)."""
    n = after["count"] - before["count"]
    for le in sorted((k for k in after if k != "count"), key=float):
        if after[le] - before.get(le, 0.0) == n:
            return int(float(le)) if le != "+Inf" else 10**9
    raise AssertionError("no bucket holds every observation")


def measure(
    mesh: Mesh, b: Budget, request: Callable[[], httpx.Response], n: int = REQUESTS
) -> tuple[int, int]:
    """Warm the path with one request, then the worst SQL and peer cost of `n` more."""
    assert request().status_code < 300
    sql0, peer0 = histogram(mesh, SQL, b), histogram(mesh, PEER, b)
    for _ in range(n):
        r = request()
        assert r.status_code < 300, r.text
    sql1, peer1 = histogram(mesh, SQL, b), histogram(mesh, PEER, b)
    # At least ours: a background caller of the same RPC (the ingress lists instances) is held
    # to the same budget.
    assert sql1["count"] - sql0["count"] >= n, (
        f"{b.route}: {sql1['count'] - sql0['count']} calls of {b.method}"
    )
    return worst(sql0, sql1), worst(peer0, peer1)


def _sql(mesh: Mesh, statement: str, *args: object) -> None:
    pg = EmbeddedPostgres(mesh.data_dir / "pg", port=int(mesh.env["CTRLMESH_EMBEDDED_PG_PORT"]))
    with psycopg.connect(pg.dsn_for("ctrlmesh"), autocommit=True) as conn:
        conn.execute(statement, args)


def _instance_row(mesh: Mesh, account_id: str, tenant_id: str) -> str:
    """An instance row written straight into the instances schema (no engine needed to read it)."""
    iid, at = f"inst_{unique('b')[2:]}", datetime.now(UTC)
    _sql(
        mesh,
        "INSERT INTO instances.instances (id, account_id, tenant_id, name, slug, provider_name, state, "
        "cpu_millis, memory_mb, disk_mb, replicas, created_at, updated_at) "
        "VALUES (%s, %s, %s, %s, %s, 'static', 'stopped', 500, 256, 1024, 1, %s, %s)",
        iid,
        account_id,
        tenant_id,
        iid,
        iid,
        at,
        at,
    )
    return iid


def test_every_route_family_stays_within_its_budget(mesh):
    """Each family's worst request costs at most its SQL and peer-call budget; Authenticate is cached."""
    account_id, key = create_account(mesh)
    c = mesh.client(key)
    tenant = unique("bud")
    t = c.post("/v2/tenants", json={"name": tenant})
    assert t.status_code == 201, t.text
    tenant_id = t.json()["tenant"]["id"]
    db = c.post(f"/v2/tenants/{tenant}/dbs", json={"name": "app", "size": "L1"})
    assert db.status_code == 201, db.text
    db_id = db.json()["db_id"]
    iid = _instance_row(mesh, account_id, tenant_id)
    # Both GetTenant RPCs of accounts served, TenantService's first: the admin series is then
    # listed after it on /metrics, where a reader that went by method name alone read the wrong one
    # (CI: "0.0 calls of GetTenant" on a mesh that earlier tests had used).
    assert c.get(f"/v2/tenants/{tenant}").status_code == 200
    with mesh.admin() as admin:
        assert admin.get(f"/v1/admin/tenants/{tenant_id}").status_code == 200

    names = iter(range(1000))

    def create() -> httpx.Response:
        return c.post(f"/v2/tenants/{tenant}/dbs", json={"name": f"b{next(names)}", "size": "L1"})

    made = iter(range(1000))

    def delete() -> httpx.Response:
        return c.delete(f"/v2/tenants/{tenant}/dbs/b{next(made)}", params={"force": "true"})

    requests: dict[str, Callable[[], httpx.Response]] = {
        "get_db_by_id": lambda: c.get(f"/v2/dbs/{db_id}"),
        "get_db_by_name": lambda: c.get(f"/v2/tenants/{tenant}/dbs/app"),
        "list_dbs": lambda: c.get(f"/v2/tenants/{tenant}/dbs", params={"limit": 20}),
        "get_tenant": lambda: c.get(f"/v2/tenants/{tenant}"),
        "contact": lambda: c.post(
            "/v2/account/contact",
            json={"email": f"{unique('o')}@acme.test", "name": "Ops", "company": "Acme"},
        ),
        "get_instance": lambda: c.get(f"/v1/instances/{iid}"),
        "list_instances": lambda: c.get("/v1/instances", params={"limit": 20}),
        "create_db": create,
        "delete_db": delete,
    }
    started, auth0 = time.monotonic(), auth_calls(mesh)
    costs = {name: measure(mesh, BUDGETS[name], fn) for name, fn in requests.items()}
    elapsed = time.monotonic() - started
    over = {
        BUDGETS[n].route: {"sql": sql, "peer": peer, "budget": (BUDGETS[n].sql, BUDGETS[n].peer)}
        for n, (sql, peer) in costs.items()
        if sql > BUDGETS[n].sql or peer > BUDGETS[n].peer
    }
    assert not over, "over budget:\n" + "\n".join(f"{route}: {cost}" for route, cost in over.items())
    # The edge's principal cache: Authenticate once per key per TTL, never once per request.
    ttl = Settings().auth_cache_ttl.total_seconds()
    assert auth_calls(mesh) - auth0 <= elapsed / ttl + 1, (auth_calls(mesh) - auth0, elapsed)


def _refused_within(bound: float, request: Callable[[], httpx.Response], codes: tuple[int, ...]) -> float:
    """Seconds until `request` answers one of `codes`; fails past `bound`."""
    started = time.monotonic()
    while True:
        r = request()
        waited = time.monotonic() - started
        if r.status_code in codes:
            return waited
        assert waited <= bound, f"still {r.status_code} after {waited:.2f}s: {r.text}"
        time.sleep(0.05)


def test_writes_see_a_suspension_at_once_and_cached_reads_a_deletion_within_the_bound(mesh):
    """Writes ask accounts (a suspension refuses the next one); a cached read sees a deleted tenant within the TTL."""
    bound = Settings().tenant_cache_ttl.total_seconds() + 1.0
    admin = mesh.admin()
    tenant = unique("sus")
    t = admin.post("/v2/tenants", json={"name": tenant})
    assert t.status_code == 201, t.text
    tenant_id = t.json()["tenant"]["id"]
    for _ in range(3):  # the tenant is in databases' cache from here on
        assert admin.get(f"/v2/tenants/{tenant}/dbs").status_code == 200
    assert admin.post(f"/v1/admin/tenants/{tenant_id}/suspend", json={"reason": "test"}).status_code == 204
    r = admin.post(f"/v2/tenants/{tenant}/dbs", json={"name": "w", "size": "L1"})
    assert r.status_code == 403 and r.json()["message"] == "tenant suspended", r.text
    assert admin.get(f"/v2/tenants/{tenant}/dbs").status_code == 200  # reads still answer
    assert admin.post(f"/v1/admin/tenants/{tenant_id}/unsuspend", json={}).status_code == 204
    assert admin.get(f"/v2/tenants/{tenant}/dbs").status_code == 200
    assert admin.delete(f"/v2/tenants/{tenant}").status_code in (200, 204)
    waited = _refused_within(bound, lambda: admin.get(f"/v2/tenants/{tenant}/dbs"), (404,))
    assert waited <= bound
