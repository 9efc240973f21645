"""A frozen service costs the route's default deadline, not 30 s: reads and writes answer 504
naming the service, `Grpc-Timeout` still wins, and `/health` names the service that does not
answer in time; gRPC's own message-size limit is a 413, never a quota."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import pytest

from tests.fixtures.api import unique
from tests.fixtures.mesh import Mesh

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dmesh(module_mesh_builder: Any) -> Mesh:
    """A private mesh with short deadlines (to keep the test fast) and a body limit above gRPC's
    4 MiB message limit (so an oversized message reaches the service)."""
    return module_mesh_builder(
        CTRLMESH_READ_DEADLINE="2s",
        CTRLMESH_WRITE_DEADLINE="3s",
        CTRLMESH_MAX_BODY_BYTES=str(8 * 1024 * 1024),
    )


def service_pid(m: Mesh, service: str) -> int:
    """The service's running process, from the launcher's pid file of that name (the order of
    the combined list is no contract: the ingress's Caddy may come first)."""
    pid = m.pid(service)
    assert pid is not None, f"{service} is not running"
    return pid


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = fn(*args, **kw)
    return r, time.monotonic() - started


def test_a_message_over_the_grpc_limit_is_413_not_quota(dmesh):
    """A 5 MiB body within the edge's limit but over gRPC's 4 MiB message size: 413 PayloadTooLarge."""
    r = dmesh.admin().post(
        "/v2/account/contact", json={"email": "a@example.com", "name": "n" * (5 * 1024 * 1024)}
    )
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge", r.text[:300]


def test_a_frozen_service_costs_the_default_deadline(dmesh):
    """SIGSTOP of databases: reads 504 after the read deadline, writes after the write deadline,
    `Grpc-Timeout` shorter still; other services keep answering; /health names databases."""
    c = dmesh.admin()
    tenant = unique("frozen")
    assert c.post("/v2/tenants", json={"name": tenant}).status_code == 201
    assert c.get(f"/v2/tenants/{tenant}/dbs").status_code == 200
    pid = service_pid(dmesh, "databases")
    os.kill(pid, signal.SIGSTOP)
    try:
        r, took = timed(c.get, f"/v2/tenants/{tenant}/dbs")
        assert r.status_code == 504 and r.json()["details"]["service"] == "databases", r.text
        assert 1.8 < took < 3.5, took
        r, took = timed(c.get, f"/v2/tenants/{tenant}/dbs", headers={"Grpc-Timeout": "500m"})
        assert r.status_code == 504 and took < 1.5, took
        r, took = timed(c.post, f"/v2/tenants/{tenant}/dbs", json={"name": "db1", "size": "L1"})
        assert r.status_code == 504 and 2.8 < took < 4.5, (r.text, took)
        r, took = timed(c.get, "/v2/api-keys/me")
        assert r.status_code == 200 and took < 1.5, (r.text, took)
        r, took = timed(dmesh.client().get, "/health")
        assert r.status_code == 503 and r.json()["failing"] == {"databases": "DEADLINE_EXCEEDED"}, r.text
        assert took < 2.5, took
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while dmesh.client().get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the resumed service did not come back"
        time.sleep(0.2)
    assert c.get(f"/v2/tenants/{tenant}/dbs").status_code == 200
