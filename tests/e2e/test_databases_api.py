"""Every /v2 database route through the edge: status codes and bodies, scope and permissions,
plan limits, asynchronous deletes, tenant cascade deletes and database events on /v2/events."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid

import httpx
import pytest

from libs.events import decode_cursor
from tests.fixtures.api import create_account, unique
from tests.fixtures.databases import Leases, run, tenant_with_db, wait_state

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

AUTOSCALER_FIELDS = (
    "current_profile",
    "target_profile",
    "candidate_profile",
    "candidate_worker_id",
    "candidate_writer_term",
    "scale_state",
    "freeze_new_checkouts",
    "lease_control_epoch",
    "autoscale_cooldown_until",
    "scale_phase_started_at",
    "scale_phase_deadline_at",
    "scale_failure_reason",
)


def test_create_answers_201_stopped_with_scale_zero_and_get_shows_the_same_object(mesh):
    """A new database is `stopped`, scale 0/0, with its timeline; by name and by id it is the same object."""
    td = tenant_with_db(mesh, size="L2")
    db = td.db
    assert db["name"] == "app" and db["tenant"] == td.tenant and db["tenant_id"] == td.tenant_id
    assert db["state"] == "stopped" and db["current_scale"] == 0 and db["target_scale"] == 0
    assert re.fullmatch(r"[0-9a-f]{32}", db["timeline"]) and str(uuid.UUID(db["db_id"])) == db["db_id"]
    assert db["size"] == "L2" and db["current_profile"] == "L2" and db["target_profile"] == "L2"
    assert (
        db["scale_state"] == "STEADY"
        and db["freeze_new_checkouts"] is False
        and db["lease_control_epoch"] == 0
    )
    assert db["worker_id"] == "" and db["active_connections"] == 0 and db["last_used_at"] is None
    for f in AUTOSCALER_FIELDS:
        assert f in db
    assert db["candidate_profile"] is None and db["scale_failure_reason"] is None
    c = mesh.admin()
    by_name = c.get(f"/v2/tenants/{td.tenant}/dbs/app")
    by_id = c.get(f"/v2/dbs/{td.db_id}")
    assert by_name.status_code == by_id.status_code == 200
    assert by_name.json() == by_id.json() == db
    assert c.get(f"/v2/tenants/{td.tenant}").json()["db_count"] == 1


def test_manual_lifecycle_and_eager_start_are_operation_disabled(mesh):
    """start/stop/scale are 403 OperationDisabled even for an all-powerful key; so is create with
    start_immediately or initial_scale=1 (and nothing is created)."""
    td = tenant_with_db(mesh)
    c = mesh.admin()
    for action, body in (("start", {}), ("stop", {}), ("scale", {"size": "L2"}), ("scale", {})):
        r = c.post(f"/v2/tenants/{td.tenant}/dbs/app/{action}", json=body)
        assert r.status_code == 403, (action, r.text)
        assert r.json()["error"] == "OperationDisabled"
    for extra in ({"start_immediately": True}, {"initial_scale": 1}):
        r = c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "eager", "size": "L1", **extra})
        assert r.status_code == 403 and r.json()["error"] == "OperationDisabled", r.text
    assert c.get(f"/v2/tenants/{td.tenant}/dbs/eager").status_code == 404
    r = c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "eager", "size": "L1", "initial_scale": 2})
    assert r.status_code == 400 and "initial_scale" in r.json()["details"]["fields"]


def test_invalid_names_and_sizes_are_400_and_duplicates_409(mesh):
    """Names are PostgreSQL-friendly and not reserved; sizes L1…L5; a name is unique per tenant only."""
    td = tenant_with_db(mesh)
    c = mesh.admin()
    for body, field in (
        ({"name": "Bad-Name", "size": "L1"}, "name"),
        ({"name": "1abc", "size": "L1"}, "name"),
        ({"name": "ok", "size": "L9"}, "size"),
        ({"name": "postgres", "size": "L1"}, "name"),
    ):
        r = c.post(f"/v2/tenants/{td.tenant}/dbs", json=body)
        assert r.status_code == 400 and r.json()["error"] == "BadRequest", r.text
        assert field in r.json()["details"]["fields"]
    r = c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "app", "size": "L1"})
    assert r.status_code == 409 and r.json()["error"] == "Conflict"
    other = tenant_with_db(mesh)  # the same name in another tenant is fine
    assert other.db["name"] == "app"


def test_trial_plan_caps_databases_across_the_account_and_sizes(mesh):
    """A trial account gets 409 LimitExceeded for a size outside its plan and for a third database."""
    _, key = create_account(mesh, plan="trial")
    c = mesh.client(key)
    name = unique("trial")
    assert c.post("/v2/tenants", json={"name": name}).status_code == 201
    r = c.post(f"/v2/tenants/{name}/dbs", json={"name": "big", "size": "L2"})
    assert r.status_code == 409 and r.json()["error"] == "LimitExceeded", r.text
    for db in ("one", "two"):
        assert c.post(f"/v2/tenants/{name}/dbs", json={"name": db, "size": "L1"}).status_code == 201
    r = c.post(f"/v2/tenants/{name}/dbs", json={"name": "three", "size": "L1"})
    assert r.status_code == 409 and r.json()["error"] == "LimitExceeded"
    assert r.json()["details"] == {"limit": "max_databases", "max": "2"}
    summary = c.get("/v2/billing/summary").json()
    assert summary["usage"]["databases"] == 2 and summary["usage"]["storage_bytes"] > 0
    assert summary["limit_used_percent"]["databases"] == 100.0


def test_another_tenants_database_is_404_with_the_body_of_a_missing_one(mesh):
    """Keys of another account see 404 NotFound, with the very body a nonexistent tenant or id gets."""
    td = tenant_with_db(mesh)
    _, stranger_key = create_account(mesh)
    s = mesh.client(stranger_key)
    missing_tenant = unique("none")

    def same(r_hidden: httpx.Response, r_missing: httpx.Response, hidden: str, missing: str) -> None:
        assert r_hidden.status_code == r_missing.status_code == 404
        a, b = r_hidden.json(), r_missing.json()
        assert a["error"] == b["error"] == "NotFound" and a["details"] == b["details"]
        assert a["message"].replace(hidden, "X") == b["message"].replace(missing, "X")

    same(
        s.get(f"/v2/tenants/{td.tenant}/dbs/app"),
        s.get(f"/v2/tenants/{missing_tenant}/dbs/app"),
        td.tenant,
        missing_tenant,
    )
    same(
        s.get(f"/v2/tenants/{td.tenant}/dbs"),
        s.get(f"/v2/tenants/{missing_tenant}/dbs"),
        td.tenant,
        missing_tenant,
    )
    random_id = str(uuid.uuid4())
    same(s.get(f"/v2/dbs/{td.db_id}"), s.get(f"/v2/dbs/{random_id}"), td.db_id, random_id)
    same(
        s.delete(f"/v2/tenants/{td.tenant}/dbs/app"),
        s.delete(f"/v2/tenants/{missing_tenant}/dbs/app"),
        td.tenant,
        missing_tenant,
    )
    assert mesh.admin().get(f"/v2/dbs/{td.db_id}").json()["state"] == "stopped"


def test_permissions_and_suspension_gate_the_writes(mesh):
    """Without can_create_db / can_delete a tenant key gets 403; a suspended tenant refuses writes."""
    td = tenant_with_db(mesh)
    c = mesh.admin()
    weak = c.post(
        "/v2/api-keys",
        json={
            "name": "ro",
            "scope": "tenant",
            "tenant": td.tenant,
            "permissions": {"can_create_db": False, "can_delete": False},
        },
    ).json()["key"]
    w = mesh.client(weak)
    assert w.get(f"/v2/tenants/{td.tenant}/dbs/app").status_code == 200
    r = w.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "more", "size": "L1"})
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"
    r = w.delete(f"/v2/tenants/{td.tenant}/dbs/app")
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"

    assert c.post(f"/v1/admin/tenants/{td.tenant_id}/suspend", json={"reason": "unpaid"}).status_code in (
        200,
        204,
    )
    r = c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "more", "size": "L1"})
    assert r.status_code == 403 and r.json() == {
        "error": "Forbidden",
        "message": "tenant suspended",
        "details": {"tenant": td.tenant},
    }
    assert c.delete(f"/v2/tenants/{td.tenant}/dbs/app").status_code == 403
    assert c.get(f"/v2/tenants/{td.tenant}/dbs/app").status_code == 200, "reads still work"
    assert c.post(f"/v1/admin/tenants/{td.tenant_id}/unsuspend", json={}).status_code in (200, 204)
    assert c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "more", "size": "L1"}).status_code == 201


def test_list_filters_by_state_and_prefix_with_limit_offset_and_total(mesh):
    """state, name_prefix (a literal prefix: `_` is no wildcard), limit and offset; total counts all matches."""
    td = tenant_with_db(mesh, db="a_one")
    c = mesh.admin()
    for db in ("a_two", "ab"):
        assert c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": db, "size": "L1"}).status_code == 201
    base = f"/v2/tenants/{td.tenant}/dbs"
    everything = c.get(base).json()
    assert everything["total"] == 3 and [d["name"] for d in everything["items"]] == ["a_one", "a_two", "ab"]
    pref = c.get(base, params={"name_prefix": "a_"}).json()
    assert pref["total"] == 2 and [d["name"] for d in pref["items"]] == ["a_one", "a_two"]
    page = c.get(base, params={"name_prefix": "a", "limit": 1, "offset": 1}).json()
    assert page["total"] == 3 and [d["name"] for d in page["items"]] == ["a_two"]
    assert c.get(base, params={"state": "stopped"}).json()["total"] == 3
    assert c.get(base, params={"state": "ready"}).json() == {"items": [], "total": 0}
    assert c.get(base, params={"state": "sleeping"}).status_code == 400


def test_delete_is_asynchronous_and_needs_force_while_running(mesh):
    """DELETE answers 202 `deleting` then the database is gone; while it runs it is 409 unless force."""
    td = tenant_with_db(mesh)
    c = mesh.admin()
    assert c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "idle", "size": "L1"}).status_code == 201
    r = c.delete(f"/v2/tenants/{td.tenant}/dbs/idle")
    assert r.status_code == 202 and r.json()["state"] == "deleting" and r.json()["name"] == "idle"
    wait_state(mesh, r.json()["db_id"], None)
    assert c.get(f"/v2/tenants/{td.tenant}/dbs/idle").status_code == 404
    assert c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "idle", "size": "L1"}).status_code == 201

    async def wake() -> int:
        leases = Leases(mesh)
        try:
            return int((await leases.acquire(td.tenant_id, "app")).writer_port)
        finally:
            await leases.close()

    port = run(wake())
    r = c.delete(f"/v2/tenants/{td.tenant}/dbs/app")
    assert (
        r.status_code == 409
        and r.json()["error"] == "InvalidState"
        and r.json()["details"] == {"state": "ready"}
    )
    r = c.delete(f"/v2/tenants/{td.tenant}/dbs/app", params={"force": "true"})
    assert r.status_code == 202 and r.json()["state"] == "deleting"
    wait_state(mesh, td.db_id, None)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_tenant_cascade_delete_removes_its_databases(mesh):
    """A tenant with databases is 409 without cascade; with it, 202, then tenant, databases and computes go."""
    td = tenant_with_db(mesh)
    c = mesh.admin()
    assert c.post(f"/v2/tenants/{td.tenant}/dbs", json={"name": "second", "size": "L1"}).status_code == 201

    async def wake() -> None:
        leases = Leases(mesh)
        try:
            await leases.acquire(td.tenant_id, "second")
        finally:
            await leases.close()

    run(wake())
    second_id = c.get(f"/v2/tenants/{td.tenant}/dbs/second").json()["db_id"]
    r = c.delete(f"/v2/tenants/{td.tenant}")
    assert r.status_code == 409 and r.json()["details"] == {"databases": "2"}
    assert c.delete(f"/v2/tenants/{td.tenant}", params={"cascade": "true"}).status_code == 202
    deadline = time.monotonic() + 20
    while c.get(f"/v2/tenants/{td.tenant}").status_code != 404:
        assert time.monotonic() < deadline, "cascade did not finish"
        time.sleep(0.2)
    assert c.get(f"/v2/dbs/{td.db_id}").status_code == 404
    assert c.get(f"/v2/dbs/{second_id}").status_code == 404


def test_database_events_reach_v2_events_with_resumable_ids(mesh):
    """/v2/events carries database.created and state changes with merged cursors holding the
    accounts and databases positions; Last-Event-ID resumes them."""
    _, key = create_account(mesh)
    c = mesh.client(key)
    tenant = unique("ev")
    assert c.post("/v2/tenants", json={"name": tenant}).status_code == 201
    seen: list[dict] = []
    ids: list[str] = []
    ready = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{mesh.base_url}/v2/events", params={"token": key}, timeout=20) as r:
            ready.set()
            for line in r.iter_lines():
                if line.startswith("id: "):
                    ids.append(line[4:])
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if (
                        seen[-1]["type"] == "database.state_changed"
                        and seen[-1]["data"]["state"] == "stopped"
                    ):
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert ready.wait(10)
    time.sleep(0.5)
    db = c.post(f"/v2/tenants/{tenant}/dbs", json={"name": "evdb", "size": "L1"}).json()
    mesh.admin().post("/v2/tenants", json={"name": unique("noise")})  # another account's: not seen
    t.join(15)
    db_events = [e for e in seen if e["type"].startswith("database.")]
    assert [e["type"] for e in db_events] == ["database.created", "database.state_changed"]
    assert db_events[0]["data"]["state"] == "creating" and db_events[0]["resource_id"] == db["db_id"]
    assert db_events[1]["data"]["previous_state"] == "creating"
    assert all(e["tenant_id"] == db["tenant_id"] for e in seen)
    assert all({"accounts", "databases"} <= set(decode_cursor(i)) for i in ids) and ids == [
        e["id"] for e in seen
    ]

    # Resume after database.created: the state change comes again, the creation does not.
    replay: list[dict] = []
    with httpx.stream(
        "GET",
        f"{mesh.base_url}/v2/events",
        headers={"Authorization": f"Bearer {key}", "Last-Event-ID": db_events[0]["id"]},
        timeout=10,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                replay.append(json.loads(line[6:]))
                if replay[-1]["type"] == "database.state_changed":
                    break
    assert [e["type"] for e in replay] == ["database.state_changed"]
    assert replay[0]["id"] == db_events[1]["id"]
