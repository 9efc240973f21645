"""Accounts, API keys, tenants and billing through the edge: status codes and bodies."""

import pytest

from tests.fixtures.api import create_account, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def account(mesh):
    """A fresh standard account and its account key."""
    account_id, key = create_account(mesh)
    return account_id, key


def test_profile_and_contact_update(mesh, account):
    """GET profile shows the account; POST contact changes it and answers the new profile."""
    account_id, key = account
    c = mesh.client(key)
    r = c.get("/v2/account/profile")
    assert r.status_code == 200
    assert r.json()["account_id"] == account_id and r.json()["plan"] == "standard_payg"
    r = c.post("/v2/account/contact", json={"email": "ops@acme.test", "name": "Ops", "company": "Acme"})
    assert r.status_code == 200, r.text
    assert (r.json()["email"], r.json()["company"]) == ("ops@acme.test", "Acme")
    assert c.get("/v2/account/profile").json()["name"] == "Ops"
    r = c.post("/v2/account/contact", json={"email": "not-an-email", "name": "Ops"})
    assert r.status_code == 400 and "email" in r.json()["details"]["fields"]


def test_tenant_lifecycle_and_credentials(mesh, account):
    """Create → get (no secrets) → credentials → rotate → list → delete (204, then 404)."""
    _, key = account
    c = mesh.client(key)
    name = unique("acme")
    r = c.post("/v2/tenants", json={"name": name})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["tenant"]["name"] == name and body["tenant"]["id"].startswith("ten_")
    assert body["pg_user"].startswith("tnt_") and len(body["pg_password"]) >= 24
    assert body["dsn_template"] == (
        f"postgres://{body['pg_user']}:{body['pg_password']}@localhost:{mesh.env['CTRLMESH_PG_PORT']}/<db-name>?sslmode=require"
    )
    got = c.get(f"/v2/tenants/{name}")
    assert got.status_code == 200 and "pg_password" not in got.text and got.json()["db_count"] == 0
    creds = c.get(f"/v2/tenants/{name}/credentials").json()
    assert creds["pg_password"] == body["pg_password"] and creds["tenant"] == name
    rotated = c.post(f"/v2/tenants/{name}/credentials/rotate")
    assert rotated.status_code == 200 and rotated.json()["pg_password"] != body["pg_password"]
    assert c.get(f"/v2/tenants/{name}/credentials").json()["pg_password"] == rotated.json()["pg_password"]
    listed = c.get("/v2/tenants", params={"limit": 50}).json()
    assert name in [t["name"] for t in listed["items"]] and listed["total"] >= 1
    assert c.delete(f"/v2/tenants/{name}").status_code == 204
    assert c.get(f"/v2/tenants/{name}").status_code == 404


def test_tenant_validation_and_conflicts(mesh, account):
    """Bad names are 400 with the field; a taken name is 409 Conflict."""
    _, key = account
    c = mesh.client(key)
    for bad in ("1abc", "has space", "", "кириллица", "x" * 64):
        r = c.post("/v2/tenants", json={"name": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"] == "BadRequest" and "name" in r.json()["details"]["fields"]
    name = unique("dup")
    assert c.post("/v2/tenants", json={"name": name}).status_code == 201
    r = c.post("/v2/tenants", json={"name": name})
    assert r.status_code == 409 and r.json()["error"] == "Conflict"


def test_trial_plan_allows_one_tenant(mesh):
    """A trial account's second tenant is 409 LimitExceeded."""
    _, key = create_account(mesh, plan="trial")
    c = mesh.client(key)
    assert c.post("/v2/tenants", json={"name": unique("first")}).status_code == 201
    r = c.post("/v2/tenants", json={"name": unique("second")})
    assert r.status_code == 409 and r.json()["error"] == "LimitExceeded"
    assert r.json()["details"]["limit"] == "max_tenants"


def test_billing_summary_reports_plan_limits_and_usage(mesh):
    """The billing summary shows the plan, its caps and the usage counted so far."""
    _, key = create_account(mesh, plan="trial")
    c = mesh.client(key)
    c.post("/v2/tenants", json={"name": unique("bill")})
    r = c.get("/v2/billing/summary")
    assert r.status_code == 200
    b = r.json()
    assert b["plan"] == "trial" and b["estimate"] is True
    assert (
        b["limits"]["max_tenants"] == 1
        and b["limits"]["max_databases"] == 2
        and b["limits"]["sizes"] == ["L1"]
    )
    assert b["usage"]["tenants"] == 1 and b["limit_used_percent"]["tenants"] == 100.0
    assert b["period_start"] < b["period_end"]


def test_api_keys_create_list_me_revoke(mesh, account):
    """Keys: the value once at create, never in lists; me; revoke makes it fail at once."""
    _, key = account
    c = mesh.client(key)
    tenant = unique("keys")
    c.post("/v2/tenants", json={"name": tenant})
    r = c.post(
        "/v2/api-keys",
        json={"name": "ci", "scope": "tenant", "tenant": tenant, "permissions": {"can_create_db": True}},
    )
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["key"].startswith("cmk_") and new["scope"] == "tenant" and new["tenant"] == tenant
    assert new["permissions"] == {
        "can_create_tenant": False,
        "can_create_db": True,
        "can_scale": False,
        "can_delete": False,
        "can_rotate_credentials": False,
    }
    listed = c.get("/v2/api-keys").json()
    assert new["id"] in [k["id"] for k in listed["items"]]
    assert all(k["key"] is None for k in listed["items"])
    me = mesh.client(new["key"]).get("/v2/api-keys/me").json()
    assert (me["id"], me["scope"], me["tenant"]) == (new["id"], "tenant", tenant)
    assert mesh.client(new["key"]).get(f"/v2/tenants/{tenant}").status_code == 200
    assert c.delete(f"/v2/api-keys/{new['id']}").status_code == 204
    r = mesh.client(new["key"]).get("/v2/api-keys/me")
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized"


def test_key_scope_rules(mesh, account):
    """No escalation: tenant keys make only tenant keys; keys cannot grant what they lack."""
    _, key = account
    c = mesh.client(key)
    tenant = unique("scope")
    c.post("/v2/tenants", json={"name": tenant})
    weak = c.post("/v2/api-keys", json={"name": "weak", "scope": "tenant", "tenant": tenant}).json()["key"]
    w = mesh.client(weak)
    assert w.post("/v2/api-keys", json={"name": "x", "scope": "account"}).status_code == 403
    r = w.post(
        "/v2/api-keys",
        json={"name": "x", "scope": "tenant", "tenant": tenant, "permissions": {"can_delete": True}},
    )
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"
    assert c.post("/v2/api-keys", json={"name": "g", "scope": "global"}).status_code == 403
    r = c.post("/v2/api-keys", json={"name": "t", "scope": "tenant"})
    assert r.status_code == 400 and "tenant_scope_needs_tenant" in r.json()["details"]["fields"]
    assert w.post("/v2/tenants", json={"name": unique("nope")}).status_code == 403
    assert w.delete(f"/v2/tenants/{tenant}").status_code == 403


def test_expired_key_is_refused(mesh, account):
    """A key past its expires_at is 401."""
    import datetime
    import time

    _, key = account
    soon = (
        (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2))
        .isoformat()
        .replace("+00:00", "Z")
    )
    new = (
        mesh.client(key)
        .post("/v2/api-keys", json={"name": "short", "scope": "account", "expires_at": soon})
        .json()
    )
    assert mesh.client(new["key"]).get("/v2/api-keys/me").status_code == 200
    time.sleep(2.5)
    assert mesh.client(new["key"]).get("/v2/api-keys/me").status_code == 401


def test_bad_keys_are_401(mesh):
    """No key, junk, and a key with a broken checksum are all 401 with the common body."""
    for headers in (
        {},
        {"Authorization": "Bearer junk"},
        {"Authorization": "Bearer cmk_" + "a" * 36},
        {"Authorization": "Basic x"},
    ):
        r = mesh.client().get("/v2/tenants", headers=headers)
        assert r.status_code == 401 and set(r.json()) == {"error", "message", "details"}
