"""The edge's generic behaviour over real HTTP: errors, 501s, SSE, health, OpenAPI, metrics,
and the services' refusal of calls without a valid signed principal."""

import json
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from openapi_spec_validator import validate

from libs import principal as principals
from tests.fixtures.api import create_account, grpc_call, unique
from tests.fixtures.mesh import ROOT, free_block

pytestmark = pytest.mark.e2e


def test_malformed_json_unknown_route_and_wrong_method(mesh):
    """Malformed JSON → 400; unknown path → 404; known path, wrong verb → 405; all with the common body."""
    c = mesh.admin()
    r = c.post("/v2/tenants", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "BadRequest"
    r = c.get("/v2/nothing-here")
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    r = c.put("/v2/tenants")
    assert r.status_code == 405 and set(r.json()) == {"error", "message", "details"}
    r = c.post("/v2/tenants", json={"name": "ok_name", "extra": 1})
    assert r.status_code == 400 and "extra" in json.dumps(r.json()["details"])


def test_routes_without_logic_answer_501(mesh):
    """A route whose service has no logic yet answers 501 NotImplemented, not 404 or 500 (read
    on whichever GET routes are still unbuilt; skipped once every one has logic)."""
    from gateway.routes import load_routes

    c = mesh.admin()
    seen = 0
    for route in load_routes():
        if route.http_method != "GET" or route.streaming:
            continue
        path = route.template
        for var in route.path_fields:
            path = path.replace("{" + var + "}", "inst_01h455vb4pex5vsknk084sn02q")
        r = c.get(path)
        if r.status_code == 501:
            assert r.json()["error"] == "NotImplemented", path
            seen += 1
        else:
            assert r.status_code < 500, f"{path}: {r.status_code} {r.text[:200]}"
    if not seen:
        pytest.skip("every GET route has logic now")


def test_validation_runs_before_501(mesh):
    """Input rules are enforced by the interceptor even where logic is missing: 400 with the fields."""
    r = mesh.admin().post("/api/v1/clusters", json={"name": "", "type": "weird"})
    assert r.status_code == 400 and r.json()["details"]["fields"]


def test_openapi_json_is_served_without_auth_and_valid(mesh):
    """GET /openapi.json needs no key and is valid OpenAPI 3.1."""
    r = mesh.client().get("/openapi.json")
    assert r.status_code == 200
    validate(r.json())
    assert "/v2/tenants/{tenant}" in r.json()["paths"]


def test_metrics_endpoint_counts_requests(mesh):
    """The edge's /metrics has request counters by route."""
    mesh.admin().get("/v2/account/profile")
    text = mesh.client().get("/metrics").text
    assert 'ctrlmesh_http_requests_total{route="GET /v2/account/profile",status="200"}' in text


def test_services_reject_missing_and_forged_principals(mesh):
    """A direct gRPC call with no principal, a forged signature or another secret is UNAUTHENTICATED."""
    req = accounts_pb2.ListTenantsRequest()
    stub = accounts_pb2_grpc.TenantServiceStub
    good = principals.sign(principals.Principal(key_id="key_x", scope="global"), mesh.internal_secret)
    forged = [(k, v if k != principals.SIGNATURE_KEY else "0" * 64) for k, v in good]
    other_secret = principals.sign(principals.Principal(key_id="key_x", scope="global"), b"x" * 32)
    for md in ([], forged, other_secret):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            grpc_call(mesh, "accounts", stub, "ListTenants", req, None, metadata=md)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_call(mesh, "accounts", stub, "ListTenants", req, None, metadata=good).total >= 0


def test_events_stream_as_sse_with_resume(mesh):
    """/v2/events streams tenant events as SSE with ids; Last-Event-ID resumes after one."""
    key = mesh.admin_key
    received: list[str] = []
    ready = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{mesh.base_url}/v2/events", params={"token": key}, timeout=20) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            ready.set()
            for line in r.iter_lines():
                received.append(line)
                if sum(1 for x in received if x.startswith("data: ") and "tenant.created" in x) >= 2:
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert ready.wait(10)
    time.sleep(0.3)
    names = [unique("sse"), unique("sse")]
    for n in names:
        assert mesh.admin().post("/v2/tenants", json={"name": n}).status_code == 201
    t.join(15)
    datas = [json.loads(x[6:]) for x in received if x.startswith("data: ")]
    created = [d for d in datas if d["type"] == "tenant.created"]
    assert [d["data"]["name"] for d in created] == names
    ids = [x[4:] for x in received if x.startswith("id: ")]
    assert ids and all(i == d["id"] for i, d in zip(ids, datas, strict=False))
    # Resume after the first creation: the second one comes again, the first does not.
    first_id = created[0]["id"]
    replay: list[dict] = []
    with httpx.stream(
        "GET",
        f"{mesh.base_url}/v2/events",
        headers={"Authorization": f"Bearer {key}", "Last-Event-ID": first_id},
        timeout=10,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                replay.append(json.loads(line[6:]))
                if any(d["type"] == "tenant.created" for d in replay):
                    break
    assert next(d for d in replay if d["type"] == "tenant.created")["data"]["name"] == names[1]


def test_events_are_scoped_to_the_key(mesh):
    """A tenant key's stream carries its own tenant's events only; a malformed resume id is 400."""
    from tests.fixtures.api import create_account

    _, account_key = create_account(mesh)
    acct = mesh.client(account_key)
    mine, other = unique("mine"), unique("other")
    acct.post("/v2/tenants", json={"name": mine})
    key = acct.post("/v2/api-keys", json={"name": "ev", "scope": "tenant", "tenant": mine}).json()["key"]
    assert mesh.client(key).get("/v2/events", params={"last_event_id": "abc"}).status_code == 400
    seen: list[dict] = []
    ready = threading.Event()

    def listen() -> None:
        with httpx.stream(
            "GET", f"{mesh.base_url}/v2/events", headers={"Authorization": f"Bearer {key}"}, timeout=20
        ) as r:
            ready.set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["type"] == "tenant.credentials_rotated":
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert ready.wait(10)
    time.sleep(0.3)
    mesh.admin().post("/v2/tenants", json={"name": other})
    acct.post(f"/v2/tenants/{mine}/credentials/rotate")
    t.join(15)
    assert [e["type"] for e in seen] == ["tenant.credentials_rotated"]
    assert seen[0]["data"]["name"] == mine


def test_health_is_degraded_naming_the_failing_service(mesh):
    """An edge whose clusters service is unreachable reports degraded (503) and names it."""
    port = free_block(2)
    env = {**mesh.env, "CTRLMESH_HTTP_PORT": str(port), "CTRLMESH_CLUSTERS_PORT": str(port + 1)}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.main"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=3)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert r.status_code == 503
        assert r.json()["status"] == "degraded" and list(r.json()["failing"]) == ["clusters"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_service_process_serves_prometheus_metrics(mesh):
    """Each service answers /metrics on its gRPC port + the offset, with RPC counters."""
    mesh.admin().post("/v2/tenants", json={"name": unique("metrics")})
    mesh.admin().get("/v2/tenants")
    offset = int(mesh.env["CTRLMESH_METRICS_PORT_OFFSET"])
    for service in ("accounts", "databases", "instances", "network", "clusters"):
        port = int(mesh.env[f"CTRLMESH_{service.upper()}_PORT"]) + offset
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200 and "ctrlmesh_grpc_server_requests_total" in r.text, service
    accounts = int(mesh.env["CTRLMESH_ACCOUNTS_PORT"]) + offset
    text = httpx.get(f"http://127.0.0.1:{accounts}/metrics").text
    assert (
        'ctrlmesh_grpc_server_requests_total{code="OK",method="ListTenants",service="ctrlmesh.accounts.v1.TenantService"}'
        in text
    )
    # Listing tenants asked the databases service for db counts: its own counter moved too.
    databases = int(mesh.env["CTRLMESH_DATABASES_PORT"]) + offset
    assert 'method="CountTenantResources"' in httpx.get(f"http://127.0.0.1:{databases}/metrics").text


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/admin/tenants?cursor=%C3%A9", "cursor"),
        ("/v1/instances?cursor=%C3%A9", "cursor"),
        ("/v1/admin/audit?cursor=%C3%A9", "cursor"),
        ("/v1/admin/audit?cursor=djE6YQBi", "cursor"),  # base64 of "v1:a\0b": a NUL inside the cursor
        ("/v2/tenants/a%00b/credentials", "tenant"),
        ("/v2/tenants/%FF%FE/credentials", "tenant"),
        ("/v1/admin/audit?action=%FF", "action"),
        ("/v1/admin/audit?action=a%00b", "action"),
    ],
)
def test_bad_ids_cursors_and_strings_are_400_naming_the_field(mesh, path, field):
    """A non-ASCII or NUL-carrying cursor, a NUL or invalid UTF-8 in a path id or a query value:
    400 BadRequest naming the field, never 500."""
    r = mesh.admin().get(path)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "BadRequest" and field in r.json()["details"]["fields"], r.text


def test_bad_json_bodies_are_400_naming_the_field(mesh):
    """A NUL or an unpaired surrogate in a JSON string names the field; JSON nested 1,000 deep is 400."""
    c = mesh.admin()
    for raw, field in (
        (b'{"name": "a\\u0000b"}', "name"),
        (b'{"name": "a\\ud800b"}', "name"),
        (b"[" * 1000 + b"]" * 1000, "body"),
        (b'{"name": ' * 1000 + b"1" + b"}" * 1000, "body"),
        (b'{"name": ' + b"[" * 70 + b"]" * 70 + b"}", "body"),
    ):
        r = c.post("/v2/tenants", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert field in r.json()["details"]["fields"], r.text


def test_refused_requests_keep_their_audit_entry(mesh):
    """A request refused for a NUL in its id is still audited, with the NUL shown as `\\0`."""
    mark = unique("nul")
    r = mesh.admin().post(f"/v2/tenants/a%00{mark}/credentials/rotate")
    assert r.status_code == 400 and "tenant" in r.json()["details"]["fields"]
    deadline = time.monotonic() + 10
    while True:
        items = mesh.admin().get("/v1/admin/audit", params={"action": "rotate_credentials"}).json()["items"]
        mine = [e for e in items if e["resource_id"] == f"a\\0{mark}"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert mine and mine[0]["outcome"] == "failure" and mine[0]["reason"] == "BadRequest", items[:3]


def test_requests_the_edge_refuses_itself_are_audited(mesh):
    """Refusals the edge makes before any RPC (invalid UTF-8 in the path, 415, 413, JSON too deep)
    on routes with an audit rule are in the audit log with outcome failure and the reason."""
    _, key = create_account(mesh)
    c = mesh.client(key)
    key_id = c.get("/v2/api-keys/me").json()["id"]
    as_json = {"Content-Type": "application/json"}
    answers = [
        c.post("/v2/tenants/%FF%FE/credentials/rotate"),
        c.post("/v2/tenants", content=b'{"name": "plain_x"}', headers={"Content-Type": "text/plain"}),
        c.post("/v2/tenants", content=b'{"name": "' + b"a" * (2 * 1024 * 1024) + b'"}', headers=as_json),
        c.post("/v2/tenants", content=b"[" * 100 + b"]" * 100, headers=as_json),
    ]
    assert [r.status_code for r in answers] == [400, 415, 413, 400], [r.text[:200] for r in answers]
    deadline = time.monotonic() + 10
    while True:
        items = mesh.admin().get("/v1/admin/audit", params={"actor_id": key_id}).json()["items"]
        if len(items) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    got = sorted((e["resource"], e["action"], e["outcome"], e["reason"], e["actor_type"]) for e in items)
    assert got == [
        ("tenant", "create", "failure", "BadRequest", "api_key"),
        ("tenant", "create", "failure", "PayloadTooLarge", "api_key"),
        ("tenant", "create", "failure", "UnsupportedMediaType", "api_key"),
        ("tenant", "rotate_credentials", "failure", "BadRequest", "api_key"),
    ], items


def _send_partial_body(mesh, framing: bytes, body: bytes) -> bytes:
    """Send headers and part of a body that never completes; return what the edge answers."""
    import socket

    head = (
        b"POST /v2/account/contact HTTP/1.1\r\nHost: edge\r\n"
        + f"Authorization: Bearer {mesh.admin_key}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + framing
        + b"\r\n"
    )
    with socket.create_connection(("127.0.0.1", mesh.http_port), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_body_limit_is_enforced_while_reading(mesh):
    """A body over CTRLMESH_MAX_BODY_BYTES (1 MiB) is 413 PayloadTooLarge, declared or streamed,
    refused as soon as it passes the limit: the edge answers though the body never completes."""
    c = mesh.admin()
    big = b'{"name": "' + b"a" * (50 * 1024 * 1024) + b'"}'
    r = c.post("/v2/account/contact", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
    assert r.json()["details"]["limit_bytes"] == 1024 * 1024
    # Declared 50 MB, 2 MiB sent, the rest never: refused on the declaration.
    answer = _send_partial_body(mesh, b"Content-Length: 52428800\r\n", b"a" * (2 * 1024 * 1024))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Chunked, no length: refused once 1 MiB has arrived, without waiting for the end.
    chunk = b"a" * (256 * 1024)
    chunks = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(8))
    answer = _send_partial_body(mesh, b"Transfer-Encoding: chunked\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    r = c.post("/v2/account/contact", json={"name": "x" * 1000})
    assert r.status_code == 400 and "email" in r.json()["details"]["fields"]


def test_bodies_must_be_json(mesh):
    """A body under another Content-Type is 415 UnsupportedMediaType; no Content-Type is read as JSON."""
    c = mesh.admin()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        r = c.post("/v2/tenants", content=b'{"name": "plain_x"}', headers={"Content-Type": ctype})
        assert r.status_code == 415 and r.json()["error"] == "UnsupportedMediaType", r.text
    name = unique("ctype")
    r = c.post("/v2/tenants", content=f'{{"name": "{name}"}}'.encode())
    assert r.status_code == 201, r.text
    r = c.post(
        "/v2/tenants",
        content=f'{{"name": "{unique("ctype")}"}}'.encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 201, r.text


def test_405_carries_allow_from_the_route_table(mesh):
    """A known path under another verb is 405 with `Allow` listing the verbs the route table has."""
    c = mesh.admin()
    r = c.put("/v2/tenants")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = c.post("/v1/instances/inst_x")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH"
    r = c.post("/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and r.json()["error"] == "MethodNotAllowed"


@pytest.mark.parametrize("suffix", ["logs/stream", "health/stream"])
def test_streams_of_a_missing_instance_are_404_before_any_event(mesh, suffix):
    """A stream of an instance that does not exist is a plain 404 JSON answer, not a 200 SSE."""
    with mesh.admin().stream("GET", f"/v1/instances/inst_01m8sj42e2e5tshspdvxvryb3n/{suffix}") as r:
        r.read()
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json()["error"] == "NotFound"


def test_events_stream_opens_before_its_first_event(mesh):
    """An idle stream still answers its headers at once (the service marks it open)."""
    started = time.monotonic()
    with httpx.stream("GET", f"{mesh.base_url}/v2/events", params={"token": mesh.admin_key}, timeout=5) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert time.monotonic() - started < 2


def test_any_path_bytes_get_a_json_answer(mesh):
    """A newline in a path segment still reaches the route table: a JSON answer, never the ASGI
    framework's plain-text 404 (found by the schemathesis gate)."""
    for path in ("/v2/tenants/%0Ax/credentials", "/v2/%0A", "/%0A/x"):
        r = mesh.admin().get(path)
        assert r.headers["content-type"] == "application/json", (path, r.text)
        assert r.status_code in (400, 404) and set(r.json()) == {"error", "message", "details"}
