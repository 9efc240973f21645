"""The ingress end to end: a real Caddy started by the launcher, configured by the network
service from its schema, in front of real containers on the test engine. Every request goes to
Caddy on loopback with the instance's hostname in the Host header."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from libs.events import encode_cursor
from tests.fixtures.api import unique
from tests.fixtures.instances import V2, Tenant, create_running, make_tenant, wait_deployment, wait_for
from tests.fixtures.mesh import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def tenant_slug(t: Tenant) -> str:
    r = t.mesh.admin().get(f"/v1/admin/tenants/{t.id}")
    assert r.status_code == 200, r.text
    return str(r.json()["slug"])


def hostname(t: Tenant, inst: dict[str, Any]) -> str:
    return f"{inst['slug']}.{tenant_slug(t)}.localhost"


def through(mesh: Mesh, host: str, path: str = "/", **kw: Any) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{mesh.ingress_http_port}{path}", headers={"Host": host}, timeout=5, **kw
    )


def attempt(mesh: Mesh, host: str, path: str = "/") -> httpx.Response | None:
    """One request, None while nothing listens (a Caddy starting again)."""
    try:
        return through(mesh, host, path)
    except httpx.HTTPError:
        return None


def wait_body(mesh: Mesh, host: str, path: str, want: str, timeout: float = 15) -> httpx.Response:
    return wait_for(
        lambda: attempt(mesh, host, path),
        lambda r: r is not None and r.status_code == 200 and want in r.text,
        timeout,
        every=0.1,
    )


@pytest.fixture(scope="module")
def ingress_tenant(imesh: Mesh) -> Tenant:
    return make_tenant(imesh, {"max_instances": 10, "max_cpu_millis": 8000, "max_memory_mb": 8192})


@pytest.fixture(scope="module")
def web(ingress_tenant: Tenant) -> dict[str, Any]:
    """A running v1 instance shared by the route tests of this module."""
    return create_running(ingress_tenant.client(), name=unique("web"))


def test_default_hostname_reaches_the_instance(ingress_tenant: Tenant, web: dict[str, Any]) -> None:
    """A new instance answers at <instance>.<tenant>.localhost on the ingress's HTTP port (its first
    container port), and an unknown host is a JSON 404."""
    mesh = ingress_tenant.mesh
    r = wait_body(mesh, hostname(ingress_tenant, web), "/", "ctrlmesh-test v1")
    assert r.headers["server"] == "Caddy"
    miss = through(mesh, f"nobody.{tenant_slug(ingress_tenant)}.localhost")
    assert miss.status_code == 404
    assert miss.json()["error"] == "NotFound"


def test_routes_strip_prefix_validation_and_tenancy(ingress_tenant: Tenant, web: dict[str, Any]) -> None:
    """A route with strip_prefix forwards /app/x as /x; a bad path or a port the instance lacks is
    400 naming the field; another tenant's instance and route are 404; PATCH and DELETE change
    what the ingress serves at once."""
    mesh, c, host = ingress_tenant.mesh, ingress_tenant.client(), hostname(ingress_tenant, web)
    iid = web["id"]
    r = c.post(f"/v1/instances/{iid}/routes", json={"path": "/app", "port": 8080, "strip_prefix": True})
    assert r.status_code == 201, r.text
    route = r.json()
    assert (route["protocol"], route["weight"], route["strip_prefix"]) == ("http", 100, True)
    assert route["id"].startswith("rte_") and route["tenant_id"] == ingress_tenant.id
    wait_body(mesh, host, "/app/", "ctrlmesh-test v1")
    assert through(mesh, host, "/app/healthz").text.strip() == "ok"
    # With routes, the instance's hostname serves only them.
    assert through(mesh, host, "/other").status_code == 404

    listed = c.get(f"/v1/instances/{iid}/routes").json()
    assert [x["id"] for x in listed["items"]] == [route["id"]] and listed["total"] == 1

    bad_path = c.post(f"/v1/instances/{iid}/routes", json={"path": "app", "port": 8080})
    assert bad_path.status_code == 400 and "path" in str(bad_path.json()["details"]), bad_path.text
    bad_port = c.post(f"/v1/instances/{iid}/routes", json={"path": "/x", "port": 9999})
    assert bad_port.status_code == 400 and "port" in str(bad_port.json()["details"]), bad_port.text

    other = make_tenant(mesh).client()
    assert other.get(f"/v1/instances/{iid}/routes").status_code == 404
    assert other.post(f"/v1/instances/{iid}/routes", json={"path": "/y", "port": 8080}).status_code == 404
    assert other.patch(f"/v1/routes/{route['id']}", json={"weight": 5}).status_code == 404
    assert other.delete(f"/v1/routes/{route['id']}").status_code == 404

    r = c.patch(f"/v1/routes/{route['id']}", json={"strip_prefix": False})
    assert r.status_code == 200 and r.json()["strip_prefix"] is False, r.text
    # Without stripping, busybox looks for /app/ and has none.
    wait_for(lambda: through(mesh, host, "/app/").status_code, lambda code: code == 404, 10, every=0.1)
    assert c.delete(f"/v1/routes/{route['id']}").status_code == 204
    assert c.delete(f"/v1/routes/{route['id']}").status_code == 404
    # No route left: the default (the first container port at /) again.
    wait_body(mesh, host, "/", "ctrlmesh-test v1")

    types = route_events(mesh, ingress_tenant, route["id"], {"route.added", "route.updated", "route.removed"})
    assert types == ["route.added", "route.updated", "route.removed"]
    audit = mesh.admin().get("/v1/admin/audit", params={"tenant_id": ingress_tenant.id, "resource": "route"})
    mine = [(e["action"], e["outcome"]) for e in audit.json()["items"] if e["resource_id"] == route["id"]]
    assert (
        ("create", "success") in mine and ("update", "success") in mine and ("delete", "success") in mine
    ), mine


def route_events(mesh: Mesh, t: Tenant, route_id: str, want: set[str]) -> list[str]:
    """The types of the route's events in /v2/events, the network stream read from its start."""
    seen: list[str] = []
    headers = {"Authorization": f"Bearer {t.key}", "Last-Event-ID": encode_cursor({"network": 0})}
    with (
        httpx.Client(base_url=mesh.base_url, headers=headers, timeout=10) as c,
        c.stream("GET", "/v2/events") as r,
    ):
        assert r.status_code == 200
        deadline = time.monotonic() + 15
        for line in r.iter_lines():
            if line.startswith("data:"):
                ev = json.loads(line[5:])
                if ev.get("resource_id") == route_id or ev.get("data", {}).get("route_id") == route_id:
                    assert ev["tenant_id"] == t.id and ev["account_id"]
                    seen.append(ev["type"])
            if want <= set(seen) or time.monotonic() > deadline:
                break
    return seen


def test_weighted_split_between_two_instances(ingress_tenant: Tenant, web: dict[str, Any]) -> None:
    """Two routes of one tenant with the same hostname and path split its traffic by weight:
    90/10 between a v1 and a v2 instance, measured over 200 requests (±10 points)."""
    mesh, c = ingress_tenant.mesh, ingress_tenant.client()
    canary = create_running(c, image=V2, name=unique("canary"))
    shop = f"shop.{tenant_slug(ingress_tenant)}.localhost"
    for inst, weight in ((web, 90), (canary, 10)):
        r = c.post(
            f"/v1/instances/{inst['id']}/routes",
            json={"path": "/", "port": 8080, "weight": weight, "hostname": shop},
        )
        assert r.status_code == 201, r.text
    foreign = c.post(
        f"/v1/instances/{web['id']}/routes",
        json={"path": "/", "port": 8080, "hostname": "shop.elsewhere.localhost"},
    )
    assert foreign.status_code == 400, foreign.text
    wait_for(
        lambda: Counter(through(mesh, shop).text.strip() for _ in range(20)),
        lambda seen: len(seen) == 2,
        20,
        every=0.1,
    )
    with httpx.Client(base_url=f"http://127.0.0.1:{mesh.ingress_http_port}", headers={"Host": shop}) as h:
        counts = Counter(h.get("/").text.strip() for _ in range(200))
    share = counts["ctrlmesh-test v1"] / 200
    assert counts["ctrlmesh-test v1"] + counts["ctrlmesh-test v2"] == 200, counts
    assert 0.80 <= share <= 1.0, counts
    print(f"split over 200 requests: {dict(counts)}")


class Looper:
    """A client looping through the ingress on its own thread, counting every answer.

    It behaves as browsers and Go's HTTP client do (RFC 9112 §9.3.1): a GET sent on a kept-alive
    connection that the server closed meanwhile (Caddy closes idle connections when it loads a
    new config) is sent once more on a fresh connection. Those retries are counted in `resets`;
    any answer other than 200, or a second failure, is a failure."""

    def __init__(self, mesh: Mesh, host: str):
        self.url = f"http://127.0.0.1:{mesh.ingress_http_port}/"
        self.host = host
        self.bodies: Counter[str] = Counter()
        self.failures: list[str] = []
        self.resets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(headers={"Host": self.host}, timeout=10) as h:
            while not self._stop.is_set():
                try:
                    try:
                        r = h.get(self.url)
                    except (httpx.ReadError, httpx.RemoteProtocolError):
                        self.resets += 1
                        r = h.get(self.url)
                    if r.status_code == 200:
                        self.bodies[r.text.strip()] += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as err:
                    self.failures.append(repr(err))

    @property
    def total(self) -> int:
        return sum(self.bodies.values()) + len(self.failures)

    def __enter__(self) -> Looper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_rolling_deploy_drops_no_request(ingress_tenant: Tenant) -> None:
    """A client looping through the ingress while a 2-replica instance rolls from v1 to v2 sees
    no failed request, and ends on v2."""
    mesh, c = ingress_tenant.mesh, ingress_tenant.client()
    inst = create_running(c, name=unique("roll"), replicas=2)
    host = hostname(ingress_tenant, inst)
    wait_body(mesh, host, "/", "ctrlmesh-test v1")
    with Looper(mesh, host) as loop:
        time.sleep(0.5)
        r = c.post(f"/v1/instances/{inst['id']}/deploy", json={"image": V2, "strategy": "rolling"})
        assert r.status_code in (201, 202), r.text
        done = wait_deployment(c, r.json()["id"], ("succeeded", "failed"), timeout=60)
        assert done["state"] == "succeeded", done
        wait_for(lambda: dict(loop.bodies), lambda b: b.get("ctrlmesh-test v2", 0) > 20, 10)
        time.sleep(1.0)
    print(
        f"rolling deploy: {loop.total} requests, {len(loop.failures)} failed, "
        f"{loop.resets} sent again after a closed idle connection, {dict(loop.bodies)}"
    )
    assert loop.failures == [], loop.failures[:5]
    assert loop.resets <= 3, loop.resets
    assert loop.bodies["ctrlmesh-test v1"] > 0 and loop.bodies["ctrlmesh-test v2"] > 0

    # A scale changes the upstream set too: three replicas, three dials in Caddy's config.
    r = c.post(f"/v1/instances/{inst['id']}/scale", json={"replicas": 3})
    assert r.status_code == 204, r.text
    wait_for(lambda: len(host_dials(mesh, host)), lambda n: n == 3, 30)


def host_dials(mesh: Mesh, host: str) -> set[str]:
    """The upstream addresses Caddy holds for one hostname (read from its admin API)."""
    config = httpx.get(f"{mesh.ingress_admin}/config/", timeout=5).json()
    routes = config["apps"]["http"]["servers"]["ingress_http"]["routes"]
    block = next((r for r in routes if r.get("match") == [{"host": [host]}]), None)
    return set(re.findall(r"127\.0\.0\.1:\d+", json.dumps(block))) if block else set()


def test_stopped_instance_answers_503(ingress_tenant: Tenant) -> None:
    """A stopped instance's hostname answers 503 with the platform's JSON error body."""
    mesh, c = ingress_tenant.mesh, ingress_tenant.client()
    inst = create_running(c, name=unique("stop"))
    host = hostname(ingress_tenant, inst)
    wait_body(mesh, host, "/", "ctrlmesh-test v1")
    assert c.post(f"/v1/instances/{inst['id']}/stop").status_code == 204
    r = wait_for(lambda: through(mesh, host), lambda r: r.status_code == 503, 20, every=0.1)
    body = r.json()
    assert body["error"] == "Unavailable" and "not running" in body["message"], body
    assert body["details"]["instance_id"] == inst["id"]


def test_killed_caddy_is_refilled(ingress_tenant: Tenant, web: dict[str, Any]) -> None:
    """Caddy killed with SIGKILL is restarted by the launcher and holds the whole config again
    within seconds (the network service reloads it from the schema)."""
    mesh = ingress_tenant.mesh
    host = hostname(ingress_tenant, web)
    wait_body(mesh, host, "/", "ctrlmesh-test v1")
    old = mesh.pid("caddy")
    assert old is not None
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    mesh.wait_new_pid("caddy", old)
    wait_body(mesh, host, "/", "ctrlmesh-test v1", timeout=15)
    refill = time.monotonic() - t0
    print(f"caddy refilled {refill:.2f} s after SIGKILL")
    assert refill < 10
