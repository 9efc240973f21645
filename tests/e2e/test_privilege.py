"""Privilege gaps closed: credential rotation needs the right key, the last global key stays,
a break-glass command mints a new one, billing for a tenant key is its tenant's only, and a key
without a name gets one."""

import os
import re
import subprocess
import sys
import threading

import psycopg
import pytest

from libs.embedded_pg import EmbeddedPostgres
from services.accounts.crypto import token_hash
from tests.fixtures.api import create_account, unique
from tests.fixtures.mesh import ROOT

pytestmark = pytest.mark.e2e


def _tenant_with_key(mesh, account_key: str, **perms: bool) -> tuple[str, str]:
    c = mesh.client(account_key)
    tenant = unique("priv")
    assert c.post("/v2/tenants", json={"name": tenant}).status_code == 201
    r = c.post("/v2/api-keys", json={"name": "t", "scope": "tenant", "tenant": tenant, "permissions": perms})
    assert r.status_code == 201, r.text
    return tenant, r.json()["key"]


def test_rotation_needs_an_account_key_or_can_rotate_credentials(mesh):
    """A tenant key without the flag gets 403 and the password stays; with the flag, or with the
    account key, rotation works; the flag cannot be granted by a key that lacks it."""
    _, key = create_account(mesh)
    c = mesh.client(key)
    tenant, plain = _tenant_with_key(mesh, key)
    before = c.get(f"/v2/tenants/{tenant}/credentials").json()["pg_password"]
    r = mesh.client(plain).post(f"/v2/tenants/{tenant}/credentials/rotate")
    assert r.status_code == 403 and r.json()["error"] == "Forbidden", r.text
    assert "can_rotate_credentials" in r.json()["message"]
    assert c.get(f"/v2/tenants/{tenant}/credentials").json()["pg_password"] == before
    # Reading the credentials stays allowed for the tenant key.
    assert mesh.client(plain).get(f"/v2/tenants/{tenant}/credentials").status_code == 200
    r = mesh.client(plain).post(
        "/v2/api-keys",
        json={
            "name": "x",
            "scope": "tenant",
            "tenant": tenant,
            "permissions": {"can_rotate_credentials": True},
        },
    )
    assert r.status_code == 403 and "can_rotate_credentials" in r.text

    r = c.post(
        "/v2/api-keys",
        json={"scope": "tenant", "tenant": tenant, "permissions": {"can_rotate_credentials": True}},
    )
    assert r.status_code == 201 and r.json()["permissions"]["can_rotate_credentials"] is True
    rotator = r.json()["key"]
    assert mesh.client(rotator).get("/v2/api-keys/me").json()["permissions"]["can_rotate_credentials"] is True
    r = mesh.client(rotator).post(f"/v2/tenants/{tenant}/credentials/rotate")
    assert r.status_code == 200, r.text
    assert r.json()["pg_password"] != before
    assert c.get(f"/v2/tenants/{tenant}/credentials").json()["pg_password"] == r.json()["pg_password"]
    # Another tenant of the same account stays invisible to it.
    other, _ = _tenant_with_key(mesh, key)
    assert mesh.client(rotator).post(f"/v2/tenants/{other}/credentials/rotate").status_code == 404
    r = c.post(f"/v2/tenants/{tenant}/credentials/rotate")
    assert r.status_code == 200, "the account key rotates without any flag"


def test_billing_for_a_tenant_key_counts_only_its_tenant(mesh):
    """Two tenants with 1 and 2 databases: the account key sees 2 tenants and 3 databases, a
    tenant key of the first sees 1 and 1, and no percent of the account's caps."""
    _, key = create_account(mesh)
    c = mesh.client(key)
    first, tkey = _tenant_with_key(mesh, key)
    second, _ = _tenant_with_key(mesh, key)
    for tenant, dbs in ((first, ["a"]), (second, ["b", "c"])):
        for db in dbs:
            r = c.post(f"/v2/tenants/{tenant}/dbs", json={"name": db, "size": "L1"})
            assert r.status_code == 201, r.text
    whole = c.get("/v2/billing/summary").json()["usage"]
    assert (whole["tenants"], whole["databases"]) == (2, 3)
    r = mesh.client(tkey).get("/v2/billing/summary")
    assert r.status_code == 200, r.text
    mine = r.json()
    assert (mine["usage"]["tenants"], mine["usage"]["databases"]) == (1, 1), mine
    assert not mine.get("limit_used_percent")
    # On a capped plan the account key still gets its percentages; the tenant key does not.
    _, trial = create_account(mesh, plan="trial")
    _, ttkey = _tenant_with_key(mesh, trial)
    assert mesh.client(trial).get("/v2/billing/summary").json()["limit_used_percent"]["tenants"] == 100.0
    assert not mesh.client(ttkey).get("/v2/billing/summary").json().get("limit_used_percent")


def test_a_key_created_without_a_name_gets_one(mesh):
    """POST /v2/api-keys without `name` is 201 with `key-<UTC yyyymmdd-hhmmss>`."""
    _, key = create_account(mesh)
    r = mesh.client(key).post("/v2/api-keys", json={"scope": "account"})
    assert r.status_code == 201, r.text
    assert re.fullmatch(r"key-\d{8}-\d{6}", r.json()["name"]), r.json()["name"]
    assert (
        mesh.client(key).post("/v2/api-keys", json={"scope": "account", "name": "x" * 101}).status_code == 400
    )


@pytest.fixture(scope="module")
def private(module_mesh_builder):
    """A mesh of its own (these tests revoke global keys, its admin key among them), and the one
    global key the tests leave working, in `survivor`."""
    m = module_mesh_builder()
    return m, {"survivor": m.admin_key}


def _global_key(mesh, key: str) -> tuple[str, str]:
    r = mesh.client(key).post("/v2/api-keys", json={"name": unique("g"), "scope": "global"})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


def _active_globals(mesh, key: str) -> list[str]:
    items = mesh.client(key).get("/v2/api-keys", params={"limit": 1000}).json()["items"]
    return sorted(k["id"] for k in items if k["scope"] == "global")


def test_the_last_global_key_cannot_be_revoked(private):
    """Revoking every other global key works; the last one is 409 InvalidState and keeps working."""
    mesh, state = private
    admin = mesh.admin()
    me = admin.get("/v2/api-keys/me").json()["id"]
    gid, gkey = _global_key(mesh, mesh.admin_key)
    assert admin.delete(f"/v2/api-keys/{me}").status_code == 204
    state["survivor"] = gkey
    assert _active_globals(mesh, gkey) == [gid]
    r = mesh.client(gkey).delete(f"/v2/api-keys/{gid}")
    assert r.status_code == 409 and r.json()["error"] == "InvalidState", r.text
    assert mesh.client(gkey).get("/v1/admin/stats").status_code == 200
    # Account keys are not held back by the rule.
    _, acct = create_account(mesh)
    aid = mesh.client(acct).get("/v2/api-keys/me").json()["id"]
    other = mesh.client(acct).post("/v2/api-keys", json={"scope": "account"}).json()["key"]
    assert mesh.client(other).delete(f"/v2/api-keys/{aid}").status_code == 204
    # An account key of the platform account sees its global keys but cannot revoke one.
    r = mesh.client(gkey).post("/v2/api-keys", json={"scope": "account"})
    assert r.status_code == 201, r.text
    r = mesh.client(r.json()["key"]).delete(f"/v2/api-keys/{gid}")
    assert r.status_code == 403 and r.json()["error"] == "Forbidden", r.text


def test_two_concurrent_revokes_of_the_last_two_global_keys_cannot_both_succeed(private):
    """Rounds of two revokes at once, one of each of the last two global keys: exactly one 204
    and one 409 every round, and one global key remains."""
    mesh, state = private
    for _ in range(6):
        survivor = state["survivor"]
        (old_id,) = _active_globals(mesh, survivor)
        new_id, new_key = _global_key(mesh, survivor)
        barrier = threading.Barrier(2)
        results: dict[str, int] = {}

        def revoke(
            key_id: str,
            with_key: str,
            barrier: threading.Barrier = barrier,
            results: dict[str, int] = results,
        ) -> None:
            with mesh.client(with_key) as c:
                barrier.wait(timeout=10)
                results[key_id] = c.delete(f"/v2/api-keys/{key_id}").status_code

        # Each key revokes itself, so both callers stay authenticated whatever the order.
        threads = [
            threading.Thread(target=revoke, args=(old_id, survivor)),
            threading.Thread(target=revoke, args=(new_id, new_key)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(results.values()) == [204, 409], results
        state["survivor"] = new_key if results[old_id] == 204 else survivor
        assert mesh.client(state["survivor"]).get("/v1/admin/stats").status_code == 200
        assert len(_active_globals(mesh, state["survivor"])) == 1


def test_break_glass_mints_a_working_global_key_into_the_database(private):
    """`python -m libs.admin_key` with the mesh's settings prints a new global key once; it works
    through the edge at once and its creation is in the audit log."""
    mesh, _ = private
    env = {**mesh.env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"}
    r = subprocess.run(
        [sys.executable, "-m", "libs.admin_key", "--name", "ops lost the keys"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert re.fullmatch(r"cmk_[0-9A-Za-z]{36}", token), r.stdout
    assert token not in r.stderr
    me = mesh.client(token).get("/v2/api-keys/me")
    assert me.status_code == 200, me.text
    assert (me.json()["scope"], me.json()["name"]) == ("global", "ops lost the keys")
    assert mesh.client(token).get("/v1/admin/stats").status_code == 200
    audit = mesh.client(token).get("/v1/admin/audit", params={"action": "break_glass_create"}).json()
    entry = next(e for e in audit["items"] if e["resource_id"] == me.json()["id"])
    assert entry["actor_id"].startswith("break-glass:") and entry["outcome"] == "success"
    # With a second global key the former last one can now go.
    (old,) = [k for k in _active_globals(mesh, token) if k != me.json()["id"]]
    assert mesh.client(token).delete(f"/v2/api-keys/{old}").status_code == 204


def test_break_glass_on_a_stopped_platform_starts_and_stops_its_database(private):
    """With the platform stopped, the command starts the embedded PostgreSQL for the moment,
    writes the key there, and stops it again."""
    mesh, _ = private
    assert mesh.stop() == 0
    r = subprocess.run(
        [sys.executable, "-m", "libs.admin_key"],
        cwd=ROOT,
        env={**mesh.env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert r.returncode == 0, r.stderr
    pg = EmbeddedPostgres(mesh.data_dir / "pg", port=int(mesh.env["CTRLMESH_EMBEDDED_PG_PORT"]))
    assert not pg.is_running(), "the command left its PostgreSQL running"
    pg.start()
    try:
        with psycopg.connect(pg.dsn_for("ctrlmesh")) as conn:
            row = conn.execute(
                "SELECT scope, revoked_at FROM accounts.api_keys WHERE token_hash = %s",
                (token_hash(r.stdout.strip()),),
            ).fetchone()
    finally:
        pg.stop()
    assert row == ("global", None)
