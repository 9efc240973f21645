"""Visibility across tenants and accounts, and the Ctrl Plane admin routes."""

import pytest

from tests.fixtures.api import create_account, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_tenants(mesh):
    """Tenant A and tenant B, each in its own account, each with a tenant-scoped key."""
    out = []
    for label in ("a", "b"):
        _, account_key = create_account(mesh)
        c = mesh.client(account_key)
        name = unique(label)
        assert c.post("/v2/tenants", json={"name": name}).status_code == 201
        key = c.post(
            "/v2/api-keys",
            json={
                "name": label,
                "scope": "tenant",
                "tenant": name,
                "permissions": {"can_create_db": True, "can_delete": True},
            },
        ).json()["key"]
        out.append((name, key, account_key))
    return out


def test_other_tenants_resources_are_404_like_missing_ones(mesh, two_tenants):
    """Tenant B's key on tenant A's routes: 404 with the same body as a random name; nothing changes."""
    (a_name, a_key, _), (_, b_key, _) = two_tenants
    b = mesh.client(b_key)
    missing = unique("missing")
    for method, suffix in (
        ("GET", ""),
        ("GET", "/credentials"),
        ("POST", "/credentials/rotate"),
        ("DELETE", ""),
    ):
        theirs = b.request(method, f"/v2/tenants/{a_name}{suffix}")
        nothing = b.request(method, f"/v2/tenants/{missing}{suffix}")
        assert theirs.status_code == nothing.status_code == 404, (method, suffix, theirs.text)
        assert theirs.json() == {
            **nothing.json(),
            "message": nothing.json()["message"].replace(missing, a_name),
        }
    a_creds = mesh.client(a_key).get(f"/v2/tenants/{a_name}/credentials").json()
    assert mesh.client(a_key).get(f"/v2/tenants/{a_name}").status_code == 200
    assert a_creds["pg_password"]  # not rotated by B's attempt
    names = [t["name"] for t in b.get("/v2/tenants").json()["items"]]
    assert a_name not in names and len(names) == 1


def test_other_accounts_keys_are_invisible(mesh, two_tenants):
    """Revoking another account's key id is 404; an account sees only its own keys."""
    (_, _, a_account_key), (_, _, b_account_key) = two_tenants
    a_keys = mesh.client(a_account_key).get("/v2/api-keys").json()["items"]
    b = mesh.client(b_account_key)
    r = b.delete(f"/v2/api-keys/{a_keys[0]['id']}")
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    assert not {k["id"] for k in a_keys} & {k["id"] for k in b.get("/v2/api-keys").json()["items"]}


def test_admin_routes_need_a_global_key(mesh, two_tenants):
    """Account and tenant keys get 403 Forbidden on /v1/admin."""
    (_, tenant_key, account_key), _ = two_tenants
    for key in (tenant_key, account_key):
        for method, path in (
            ("GET", "/v1/admin/stats"),
            ("GET", "/v1/admin/tenants"),
            ("POST", "/v1/admin/tenants"),
            ("GET", "/v1/admin/audit"),
        ):
            r = mesh.client(key).request(method, path, json={"name": "x"} if method == "POST" else None)
            assert r.status_code == 403 and r.json()["error"] == "Forbidden", (path, r.text)


def test_admin_tenant_crud_suspend_and_quota(mesh):
    """Create (201) → get → patch → suspend/unsuspend (204) → quota get/put → delete (204)."""
    c = mesh.admin()
    slug = unique("acme").replace("_", "-")
    r = c.post(
        "/v1/admin/tenants",
        json={
            "name": "Acme Corp " + slug,
            "slug": slug,
            "plan": "pro",
            "external_id": "crm-42",
            "metadata": {"tier": "gold"},
        },
    )
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["id"].startswith("ten_") and t["slug"] == slug and t["plan"] == "pro" and t["status"] == "active"
    assert t["quota"] == {
        "max_instances": 5,
        "max_cpu_millis": 4000,
        "max_memory_mb": 8192,
        "max_disk_mb": 20480,
        "max_domains": 10,
        "max_secrets": 50,
    }
    assert t["metadata"] == {"tier": "gold"} and t["suspended_at"] is None
    tid = t["id"]
    assert c.get(f"/v1/admin/tenants/{tid}").json()["external_id"] == "crm-42"
    r = c.patch(f"/v1/admin/tenants/{tid}", json={"plan": "enterprise"})
    assert r.status_code == 200 and r.json()["plan"] == "enterprise" and r.json()["name"] == t["name"]
    assert c.post(f"/v1/admin/tenants/{tid}/suspend", json={"reason": "payment overdue"}).status_code == 204
    s = c.get(f"/v1/admin/tenants/{tid}").json()
    assert s["status"] == "suspended" and s["suspended_at"] and s["suspend_reason"] == "payment overdue"
    assert c.get("/v1/admin/tenants", params={"status": "suspended", "limit": 1000}).json()["total"] >= 1
    assert c.post(f"/v1/admin/tenants/{tid}/unsuspend", json={}).status_code == 204
    assert c.get(f"/v1/admin/tenants/{tid}").json()["status"] == "active"
    q = c.get(f"/v1/admin/tenants/{tid}/quota").json()
    assert q["tenant"] == tid and q["used"] == {
        "instances": 0,
        "cpu_millis": 0,
        "memory_mb": 0,
        "disk_mb": 0,
        "domains": 0,
        "secrets": 0,
    }
    new_quota = {
        "max_instances": 2,
        "max_cpu_millis": 1000,
        "max_memory_mb": 512,
        "max_disk_mb": 1024,
        "max_domains": 1,
        "max_secrets": 3,
    }
    assert c.put(f"/v1/admin/tenants/{tid}/quota", json=new_quota).status_code == 204
    assert c.get(f"/v1/admin/tenants/{tid}/quota").json()["quota"] == new_quota
    r = c.put(f"/v1/admin/tenants/{tid}/quota", json={**new_quota, "max_instances": -1})
    assert r.status_code == 400
    assert c.delete(f"/v1/admin/tenants/{tid}").status_code == 204
    assert c.get(f"/v1/admin/tenants/{tid}").status_code == 404


def test_admin_list_cursor_is_stable(mesh):
    """Pages of /v1/admin/tenants chain through next_cursor without gaps or repeats."""
    c = mesh.admin()
    made = set()
    for _ in range(5):
        made.add(c.post("/v1/admin/tenants", json={"name": unique("page")}).json()["id"])
    seen, cursor, pages = [], "", 0
    while True:
        r = c.get(
            "/v1/admin/tenants", params={"limit": 2, "cursor": cursor} if cursor else {"limit": 2}
        ).json()
        seen += [t["id"] for t in r["items"]]
        pages += 1
        if not r["next_cursor"]:
            break
        cursor = r["next_cursor"]
        c.post("/v1/admin/tenants", json={"name": unique("late")})  # rows created meanwhile don't shift pages
    assert made <= set(seen) and len(seen) == len(set(seen)) and pages >= 3
    assert c.get("/v1/admin/tenants", params={"cursor": "garbage!"}).status_code == 400


def test_admin_stats_are_live_counts(mesh):
    """Stats count tenants as they change."""
    c = mesh.admin()
    before = c.get("/v1/admin/stats").json()
    tid = c.post("/v1/admin/tenants", json={"name": unique("stat")}).json()["id"]
    c.post(f"/v1/admin/tenants/{tid}/suspend", json={"reason": "test"})
    after = c.get("/v1/admin/stats").json()
    assert after["total_tenants"] == before["total_tenants"] + 1
    assert after["suspended_tenants"] == before["suspended_tenants"] + 1
    assert set(after) >= {"total_instances", "running_instances", "total_providers", "healthy_providers"}


def test_audit_log_records_mutations_with_filters_and_cursor(mesh):
    """Every mutating call leaves an entry (success and failure), queryable by filters."""
    c = mesh.admin()
    tid = c.post("/v1/admin/tenants", json={"name": unique("aud")}).json()["id"]
    c.post(f"/v1/admin/tenants/{tid}/suspend", json={"reason": "x"})
    c.post(f"/v1/admin/tenants/{tid}/unsuspend", json={})
    c.post("/v2/tenants", json={"name": "1bad"})  # a failing create is audited too
    r = c.get("/v1/admin/audit", params={"tenant_id": tid}).json()
    actions = [e["action"] for e in r["items"]]
    assert actions == ["unsuspend", "suspend", "create"] and r["total"] == 3
    e = r["items"][0]
    assert e["id"].startswith("aud_") and e["resource"] == "tenant" and e["resource_id"] == tid
    assert e["outcome"] == "success" and e["actor_type"] == "api_key" and e["actor_id"].startswith("key_")
    me = c.get("/v2/api-keys/me").json()["id"]
    fails = c.get(
        "/v1/admin/audit", params={"actor_id": me, "resource": "tenant", "action": "create", "limit": 1000}
    ).json()
    assert any(x["outcome"] == "failure" and x["reason"] == "BadRequest" for x in fails["items"])
    page = c.get("/v1/admin/audit", params={"tenant_id": tid, "limit": 2}).json()
    rest = c.get(
        "/v1/admin/audit", params={"tenant_id": tid, "limit": 2, "cursor": page["next_cursor"]}
    ).json()
    assert [x["action"] for x in page["items"] + rest["items"]] == actions
    since = e["created_at"]
    assert all(
        x["created_at"] >= since for x in c.get("/v1/admin/audit", params={"since": since}).json()["items"]
    )


def test_cascade_delete_of_a_tenant(mesh):
    """DELETE with cascade on an empty tenant is immediate (204) and it is gone."""
    c = mesh.admin()
    name = unique("casc")
    c.post("/v2/tenants", json={"name": name})
    r = c.delete(f"/v2/tenants/{name}", params={"cascade": "true"})
    assert r.status_code == 204
    assert c.get(f"/v2/tenants/{name}").status_code == 404
