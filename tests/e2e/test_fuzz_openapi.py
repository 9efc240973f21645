"""The contract gate: schemathesis over every operation of the live `/openapi.json`, with an
admin (global) key and a tenant key: no 5xx other than the 501s of routes without logic, auth
never ignored, and status codes, content types and response bodies as the document says.

Bounded and reproducible: a fixed number of examples per operation, derandomized (Hypothesis
draws from a seed derived from each test), no example database."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis import checks
from schemathesis.core.failures import FailureGroup

from gateway.routes import PUBLIC_ROUTES, load_routes
from gateway.routes_report import implemented_methods
from tests.fixtures.api import unique
from tests.fixtures.instances import MESH_ENV
from tests.fixtures.mesh import Mesh

log = logging.getLogger("tests.fuzz")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EXAMPLES = 5
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def fmesh(module_mesh_builder: Any, docker_host: str) -> Mesh:
    """A private mesh on the test engine (every service has its real dependencies, so a 503 is a
    finding): the fuzzer creates and deletes at random, which no other test should see."""
    return module_mesh_builder(DOCKER_HOST=docker_host, **MESH_ENV)


def tenant_key(m: Mesh) -> str:
    c = m.admin()
    name = unique("fuzz")
    assert c.post("/v2/tenants", json={"name": name}).status_code == 201
    r = c.post("/v2/api-keys", json={"name": "fuzz", "scope": "tenant", "tenant": name})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def unimplemented() -> set[str]:
    """`METHOD /template` of every route whose method has no logic (`make routes` says 501)."""
    done = implemented_methods()
    return {f"{r.http_method} {r.template}" for r in load_routes() if r.grpc_path not in done}


def run_operation(op: Any, base_url: str, key: str, failures: list[str], allowed_501: set[str]) -> int:
    label = f"{op.method.upper()} {op.path}"
    calls = 0
    # An open SSE stream never ends: read it for a moment (schemathesis keeps what came).
    streaming = "text/event-stream" in str(op.definition.raw.get("responses", {}))
    read_for = 0.5 if streaming else 20

    @hypothesis.settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @given(case=op.as_strategy())
    def one(case: Any) -> None:
        nonlocal calls
        calls += 1
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=read_for)
        if response.status_code == 501 and label in allowed_501:
            return
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, FailureGroup) as err:  # keep each failure's text and go on
            failures.append(f"{label} [{response.status_code}] {str(err)[:600]}")

    started = time.monotonic()
    one()
    took = time.monotonic() - started
    if took > 3:
        log.info("slow operation: %s %.1fs", label, took)
    return calls


def test_every_operation_conforms_with_admin_and_tenant_keys(fmesh):
    """Every operation with a global key and a tenant key: only documented statuses, content
    types and bodies, and no 5xx but the 501 of a route without logic."""
    doc = httpx.get(f"{fmesh.base_url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(doc)
    allowed_501 = unimplemented()
    failures: list[str] = []
    started = time.monotonic()
    calls = 0
    ops = [r.ok() for r in schema.get_all_operations()]
    for key in (fmesh.admin_key, tenant_key(fmesh)):
        for op in ops:
            calls += run_operation(op, fmesh.base_url, key, failures, allowed_501)
    took = time.monotonic() - started
    log.warning("fuzz: %d operations, %d calls in %.1fs", len(ops), calls, took)
    assert not failures, "\n".join(failures)
    assert len(ops) == len(load_routes()) + len(PUBLIC_ROUTES) and calls >= 2 * len(ops), calls


def test_no_operation_ignores_auth(fmesh):
    """Without a key, or with a wrong one, every operation but PUBLIC_ROUTES is 401."""
    doc = httpx.get(f"{fmesh.base_url}/openapi.json", timeout=10).json()
    public = {(m, p) for m, p in PUBLIC_ROUTES}
    wrong: list[str] = []
    with httpx.Client(base_url=fmesh.base_url, timeout=10) as c:
        for path, ops in doc["paths"].items():
            concrete = path.replace("{", "x").replace("}", "")
            for verb in ops:
                for headers in ({}, {"Authorization": "Bearer ctrlmesh_not_a_key"}):
                    r = c.request(verb.upper(), concrete, headers=headers)
                    expected = (
                        r.status_code != 401 if (verb.upper(), path) in public else r.status_code == 401
                    )
                    if not expected:
                        wrong.append(f"{verb.upper()} {path} {headers or 'no key'}: {r.status_code}")
    assert not wrong, wrong
