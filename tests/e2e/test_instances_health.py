"""Health checks that really run: http, tcp, grpc and command checks against a live instance,
the runner on its interval, retries, the aggregate, run-now, delete, and the SSE stream."""

from __future__ import annotations

import json
import threading

import pytest

from tests.fixtures.instances import wait_for

pytestmark = pytest.mark.e2e


def test_checks_of_every_type_run_on_their_interval(imesh, running_instance):
    """http/tcp on the instance's own port, grpc (the gRPC health protocol) against a gRPC
    server on 127.0.0.1, and a command inside the container all turn healthy by themselves."""
    tenant, inst = running_instance
    c = tenant.client()
    iid = inst["id"]
    assert c.get(f"/v1/instances/{iid}/health").json()["status"] == "unknown"
    grpc_target = imesh.grpc_target("instances")
    bodies = [
        {
            "name": "http",
            "type": "http",
            "target": "http://localhost:8080/healthz",
            "interval": "1s",
            "timeout": "1s",
        },
        {"name": "tcp", "type": "tcp", "target": "localhost:8080", "interval": "1s", "timeout": "1s"},
        {"name": "grpc", "type": "grpc", "target": grpc_target, "interval": "1s", "timeout": "1s"},
        {
            "name": "cmd",
            "type": "command",
            "target": "test -f /www/index.html",
            "interval": "2s",
            "timeout": "2s",
        },
    ]
    made = []
    for b in bodies:
        r = c.post(f"/v1/instances/{iid}/health/checks", json=b)
        assert r.status_code == 201, r.text
        made.append(r.json())
        assert (
            r.json()["id"].startswith("chk_")
            and r.json()["interval"] == b["interval"]
            and r.json()["retries"] == 3
        )
    health = wait_for(
        lambda: c.get(f"/v1/instances/{iid}/health").json(), lambda h: h["status"] == "healthy", 20
    )
    assert {x["name"]: x["status"] for x in health["checks"]} == {b["name"]: "healthy" for b in bodies}
    assert (
        health["uptime_percent"] == 100.0 and health["consecutive_failures"] == 0 and health["last_checked"]
    )
    http = next(x for x in health["checks"] if x["name"] == "http")
    assert http["last_result"]["status_code"] == 200
    listed = c.get(f"/v1/instances/{iid}/health/checks").json()
    assert listed["total"] == 4 and {x["id"] for x in listed["items"]} == {m["id"] for m in made}
    run = c.post(f"/v1/health/checks/{made[3]['id']}/run")
    assert (
        run.status_code == 200 and run.json()["status"] == "healthy" and run.json()["id"].startswith("hres_")
    )
    for m in made:
        assert c.delete(f"/v1/health/checks/{m['id']}").status_code == 204
    assert c.get(f"/v1/instances/{iid}/health").json()["status"] == "unknown"
    assert c.delete(f"/v1/health/checks/{made[0]['id']}").status_code == 404


def test_failures_count_after_retries_and_degrade_the_instance(imesh, running_instance):
    """A failing command check stays within its retries, then turns unhealthy; with a passing
    check beside it the instance is degraded; the stream delivers each result as SSE."""
    tenant, inst = running_instance
    c = tenant.client()
    iid = inst["id"]
    ok = c.post(
        f"/v1/instances/{iid}/health/checks",
        json={"name": "ok", "type": "tcp", "target": "localhost:8080", "interval": "1s", "timeout": "1s"},
    ).json()
    bad = c.post(
        f"/v1/instances/{iid}/health/checks",
        json={
            "name": "bad",
            "type": "command",
            "target": "exit 3",
            "interval": "30s",
            "timeout": "2s",
            "retries": 2,
        },
    ).json()
    events: list[dict] = []

    def listen() -> None:
        with tenant.client().stream("GET", f"/v1/instances/{iid}/health/stream") as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if any(e["check_id"] == bad["id"] for e in events) and len(events) >= 3:
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    # The runner runs the new check once at once: one failure, still within its 2 retries.
    h = wait_for(
        lambda: c.get(f"/v1/instances/{iid}/health").json(),
        lambda h: all(x["last_result"] for x in h["checks"]),
        15,
    )
    by_name = {x["name"]: x for x in h["checks"]}
    assert by_name["bad"]["last_result"]["status"] == "unhealthy" and by_name["bad"]["status"] == "unknown"
    assert h["status"] == "degraded"
    run = c.post(f"/v1/health/checks/{bad['id']}/run").json()
    assert run["status"] == "unhealthy" and run["message"].startswith("exit 3")
    h = c.get(f"/v1/instances/{iid}/health").json()
    assert h["status"] == "degraded" and {x["name"]: x["status"] for x in h["checks"]}["bad"] == "unhealthy"
    assert 0 < h["uptime_percent"] < 100
    t.join(20)
    assert any(e["check_id"] == bad["id"] and e["status"] == "unhealthy" for e in events)
    assert any(e["check_id"] == ok["id"] for e in events)


def test_check_targets_are_validated(imesh, running_instance):
    """A localhost port the instance does not have, or a malformed target, is 400."""
    tenant, inst = running_instance
    c = tenant.client()
    for body in (
        {"name": "x", "type": "http", "target": "http://localhost:9999/"},
        {"name": "x", "type": "tcp", "target": "nohostport"},
        {"name": "x", "type": "smoke", "target": "x"},
        {"name": "x", "type": "http", "target": "http://localhost:8080/", "interval": "1s", "timeout": "5s"},
    ):
        r = c.post(f"/v1/instances/{inst['id']}/health/checks", json=body)
        assert r.status_code == 400, (body, r.text)
