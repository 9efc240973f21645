"""Custom domains end to end on real components: a real DNS server the test writes, Pebble as
the ACME CA, the instance on the Docker engine and Caddy as the ingress. Add a domain, fail to
verify it without its TXT record, create the record, verify, get a certificate from Pebble and
reach the instance over HTTPS by that hostname; renewal replaces the served certificate; the
refusals (400, 409, 429, cross-tenant 404) and the events."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from tests.fixtures.acme import Pebble
from tests.fixtures.api import unique
from tests.fixtures.dns import DnsServer
from tests.fixtures.instances import MESH_ENV, Tenant, create_body, destroy, make_tenant, wait_for, wait_state
from tests.fixtures.mesh import Mesh, free_port

# The first test of the module also pays for starting Pebble and the mesh (a minute on a loaded
# machine).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

QUOTA = {"max_instances": 3, "max_cpu_millis": 4000, "max_memory_mb": 4096, "max_domains": 2}


@dataclass
class Stand:
    mesh: Mesh
    pebble: Pebble
    dns: DnsServer
    http_port: int
    https_port: int
    root: Path

    def host(self, label: str) -> str:
        """A fresh hostname of the test zone, resolving to 127.0.0.1."""
        name = f"{unique(label).replace('_', '-')}.example.test"
        self.dns.zone.add_host(name)
        return name


@pytest.fixture(scope="module")
def stand(
    module_mesh_builder: Callable[..., Mesh],
    docker_host: str,
    pebble_factory: Callable[[int], Pebble],
    dns_server: DnsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Stand:
    http, https = free_port(), free_port()
    pebble = pebble_factory(http)
    mesh = module_mesh_builder(
        DOCKER_HOST=docker_host,
        **MESH_ENV,
        CTRLMESH_INGRESS_HTTP_PORT=str(http),
        CTRLMESH_INGRESS_HTTPS_PORT=str(https),
        CTRLMESH_INGRESS_ADMIN_PORT=str(free_port()),
        CTRLMESH_DNS_RESOLVER=dns_server.address,
        CTRLMESH_DOMAIN_RECHECK="1s",
        CTRLMESH_ACME_DIRECTORY=pebble.directory,
        CTRLMESH_ACME_CA_BUNDLE=str(pebble.ca_bundle),
        CTRLMESH_ACME_EMAIL="ops@example.test",
        # Pebble's certificates live an hour: every one is due for renewal at once.
        CTRLMESH_CERT_RENEW_BEFORE="2h",
        CTRLMESH_CERT_RENEW_INTERVAL="3s",
        CTRLMESH_ACME_RETRY="1s",
    )
    root = tmp_path_factory.mktemp("pebble-root") / "root.pem"
    root.write_text(pebble.root_pem())
    return Stand(mesh, pebble, dns_server, http, https, root)


@pytest.fixture
def tenant(stand: Stand) -> Tenant:
    return make_tenant(stand.mesh, QUOTA)


@pytest.fixture
def instances(docker_host: str) -> Iterator[Callable[[Tenant], dict[str, Any]]]:
    """Instances made by a test, destroyed on the engine after it."""
    made: list[tuple[Tenant, str]] = []

    def make(t: Tenant) -> dict[str, Any]:
        r = t.client().post("/v1/instances", json=create_body())
        assert r.status_code == 201, r.text
        made.append((t, r.json()["id"]))
        return dict(r.json())

    yield make
    for t, instance_id in made:
        destroy(t.client(), docker_host, instance_id)


def _events(stand: Stand, key: str, stop: threading.Event, out: list[dict[str, Any]]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("GET", f"{stand.mesh.base_url}/v2/events", headers=headers, timeout=100) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                ev = json.loads(line[6:])
                if ev["type"].startswith(("domain.", "certificate.")):
                    out.append(ev)
            if stop.is_set():
                return


@pytest.fixture
def events(stand: Stand, tenant: Tenant) -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    stop = threading.Event()
    t = threading.Thread(target=_events, args=(stand, tenant.key, stop, seen), daemon=True)
    t.start()
    time.sleep(2.5)  # the merged stream has every service's head
    yield seen
    stop.set()


def _domain(c: httpx.Client, instance_id: str, domain_id: str) -> dict[str, Any]:
    items = c.get(f"/v1/instances/{instance_id}/domains").json()["items"]
    return next(d for d in items if d["id"] == domain_id)


def _served_serial(stand: Stand, hostname: str) -> str:
    """The serial of the certificate the ingress serves for `hostname` (SNI), hex."""
    ctx = ssl.create_default_context(cafile=str(stand.root))
    with socket.create_connection(("127.0.0.1", stand.https_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=hostname) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def _curl(stand: Stand, hostname: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--cacert",
            str(stand.root),
            "--resolve",
            f"{hostname}:{stand.https_port}:127.0.0.1",
            f"https://{hostname}:{stand.https_port}/",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_domain_verified_through_dns_gets_a_certificate_and_serves_https(
    stand: Stand, tenant: Tenant, events: list[dict[str, Any]], instances: Callable[[Tenant], dict[str, Any]]
) -> None:
    """Add → verify fails without the TXT record (409 with what was found) → create it → verify
    → certificate issued by Pebble → curl over HTTPS by the hostname reaches the instance; the
    forced renewal replaces the served certificate while a client keeps connecting; the events
    of every step carry the tenant and account."""
    c = tenant.client()
    inst = instances(tenant)
    host = stand.host("shop")

    r = c.post(f"/v1/instances/{inst['id']}/domains", json={"hostname": host.upper()})
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["hostname"] == host and d["verified"] is False and d["tls_enabled"] is False
    assert d["id"].startswith("dom_") and d["verify_token"] and d["dns_target"] == "localhost"
    assert d["txt_record"] == f"_ctrlmesh-challenge.{host}"

    r = c.post(f"/v1/domains/{d['id']}/verify", json={})
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "VerificationFailed"
    assert (
        body["details"]["txt_record"] == d["txt_record"] and body["details"]["expected"] == d["verify_token"]
    )
    assert body["details"]["problem"] == "nxdomain" and "does not exist" in body["message"]

    stand.dns.zone.set_txt(d["txt_record"], "some-other-value")
    r = c.post(f"/v1/domains/{d['id']}/verify", json={})
    assert r.status_code == 409 and r.json()["details"]["found"] == "some-other-value", r.text

    r = c.post(f"/v1/domains/{d['id']}/cert", json={})
    assert r.status_code == 409 and r.json()["error"] == "InvalidState", r.text
    wait_state(c, inst["id"], "running")

    stand.dns.zone.set_txt(d["txt_record"], "some-other-value", d["verify_token"])
    r = c.post(f"/v1/domains/{d['id']}/verify", json={})
    assert r.status_code == 200, r.text
    assert r.json()["verified"] is True and r.json()["verified_at"]

    t0 = time.monotonic()
    r = c.post(f"/v1/domains/{d['id']}/cert", json={})
    assert r.status_code == 202, r.text
    cert = r.json()
    assert cert["id"].startswith("cert_") and cert["status"] == "pending" and cert["auto_renew"] is True
    done = wait_for(
        lambda: _domain(c, inst["id"], d["id"]),
        lambda x: (x.get("certificate") or {}).get("status") == "issued",
        30,
    )
    issue_seconds = time.monotonic() - t0
    assert done["tls_enabled"] is True and done["cert_expiry"] == done["certificate"]["expires_at"]
    assert "Pebble" in done["certificate"]["issuer"] and done["certificate"]["not_before"]

    served = wait_for(lambda: _curl(stand, host), lambda p: p.returncode == 0, 20)
    assert served.stdout.strip() == "ctrlmesh-test v1", served  # the instance's own page
    first = _served_serial(stand, host)

    # Renewal (forced: Pebble's lifetime is below CTRLMESH_CERT_RENEW_BEFORE) swaps the served
    # certificate; a client connecting all along sees no failure.
    failures: list[str] = []
    answered: list[str] = []
    retried: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            p = _curl(stand, host)
            if p.returncode != 0:
                # A handshake that races Caddy 2.6's config load can be reset; a client's one
                # retry on a new connection must then succeed (counted and reported).
                retried.append(p.stderr)
                p = _curl(stand, host)
            if p.returncode == 0 and p.stdout.strip() == "ctrlmesh-test v1":
                answered.append(p.stdout)
            else:
                failures.append(p.stderr or p.stdout)

    loop = threading.Thread(target=client_loop, daemon=True)
    loop.start()
    t1 = time.monotonic()
    wait_for(lambda: _served_serial(stand, host), lambda s: s != first, 30)
    swap_seconds = time.monotonic() - t1
    stop.set()
    loop.join(10)
    assert failures == [] and answered
    renewed = _domain(c, inst["id"], d["id"])["certificate"]
    assert renewed["renewed_at"] and renewed["serial"] != ""

    r = c.delete(f"/v1/domains/{d['id']}")
    assert r.status_code == 204, r.text
    wait_for(lambda: _curl(stand, host).returncode, lambda code: code != 0, 15)

    want = {
        "domain.added",
        "domain.verification_failed",
        "domain.verified",
        "certificate.issued",
        "certificate.renewed",
        "domain.removed",
    }
    seen = wait_for(lambda: events, lambda evs: want <= {e["type"] for e in evs}, 15)
    for e in seen:
        assert e["tenant_id"] == tenant.id and e["account_id"], e
    assert not any("PRIVATE KEY" in json.dumps(e) for e in seen)
    # The certificate's key never reaches a log (it travels only to Caddy's loopback admin API).
    assert stand.mesh.log_path is not None and "PRIVATE KEY" not in stand.mesh.log_path.read_text()
    print(
        f"issue with Pebble through the ingress: {issue_seconds:.2f} s; renewal swap seen in "
        f"{swap_seconds:.2f} s with {len(answered)} HTTPS requests answered, {len(failures)} failed, "
        f"{len(retried)} retried once after a reset"
    )


def test_refusals_quota_and_tenancy(
    stand: Stand, tenant: Tenant, instances: Callable[[Tenant], dict[str, Any]]
) -> None:
    """Invalid hostnames are 400 naming the field; a taken hostname is 409 (across tenants);
    the third domain of a tenant with max_domains 2 is 429; every id route of another tenant's
    domain is 404 like a missing one; a deleted domain is gone."""
    c = tenant.client()
    inst = instances(tenant)
    base = f"/v1/instances/{inst['id']}/domains"
    for bad in ("10.1.2.3", "localhost", "web.acme.localhost", "a..example.test", "-x.example.test"):
        r = c.post(base, json={"hostname": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"] == "BadRequest" and "hostname" in r.json()["details"]["fields"], r.text

    one = c.post(base, json={"hostname": stand.host("q1")})
    assert one.status_code == 201, one.text
    idn = c.post(base, json={"hostname": "Bücher-" + unique("x").replace("_", "") + ".example.test"})
    assert idn.status_code == 201 and idn.json()["hostname"].startswith("xn--"), idn.text
    r = c.post(base, json={"hostname": stand.host("q3")})
    assert r.status_code == 429 and r.json()["error"] == "QuotaExceeded", r.text
    assert r.json()["details"]["quota"] == "max_domains"

    other = make_tenant(stand.mesh, QUOTA)
    oc = other.client()
    o_inst = instances(other)
    r = oc.post(f"/v1/instances/{o_inst['id']}/domains", json={"hostname": one.json()["hostname"]})
    assert r.status_code == 409 and r.json()["error"] == "Conflict", r.text

    dom = one.json()["id"]
    missing = "dom_01jz0000000000000000000000"
    for method, path in (
        ("POST", f"/v1/domains/{dom}/verify"),
        ("POST", f"/v1/domains/{dom}/cert"),
        ("DELETE", f"/v1/domains/{dom}"),
        ("GET", f"/v1/instances/{inst['id']}/domains"),
        ("POST", f"/v1/instances/{inst['id']}/domains"),
    ):
        body = {"hostname": stand.host("x")} if path.endswith("/domains") else {}
        theirs = oc.request(method, path, json=body if method == "POST" else None)
        assert theirs.status_code == 404, (method, path, theirs.text)
    r_missing = oc.post(f"/v1/domains/{missing}/verify", json={})
    r_theirs = oc.post(f"/v1/domains/{dom}/verify", json={})
    assert r_missing.json()["error"] == r_theirs.json()["error"] == "NotFound"
    assert r_theirs.json()["message"].replace(dom, "ID") == r_missing.json()["message"].replace(missing, "ID")

    assert c.delete(f"/v1/domains/{dom}").status_code == 204
    assert c.delete(f"/v1/domains/{dom}").status_code == 404
    assert c.post(base, json={"hostname": stand.host("q4")}).status_code == 201  # the slot is free again

    audit = (
        stand.mesh.admin()
        .get("/v1/admin/audit", params={"tenant_id": tenant.id, "resource": "domain"})
        .json()
    )
    actions = {(e["action"], e["outcome"]) for e in audit["items"]}
    assert {("create", "success"), ("create", "failure"), ("delete", "success")} <= actions, actions


def test_background_recheck_verifies_and_a_refused_certificate_fails(
    stand: Stand, tenant: Tenant, instances: Callable[[Tenant], dict[str, Any]]
) -> None:
    """A pending domain whose TXT record appears is verified by the background re-check alone;
    a certificate the CA cannot validate (the hostname does not resolve) ends `failed` with the
    CA's error; a domain created with tls_enabled gets its certificate once verified; the
    workers' changes are audited."""
    c = tenant.client()
    inst = instances(tenant)
    host = f"{unique('nodns').replace('_', '-')}.example.test"  # no A record: Pebble cannot reach it
    d = c.post(f"/v1/instances/{inst['id']}/domains", json={"hostname": host}).json()
    stand.dns.zone.set_txt(d["txt_record"], d["verify_token"])
    wait_for(lambda: _domain(c, inst["id"], d["id"]), lambda x: x["verified"], 15)

    assert c.post(f"/v1/domains/{d['id']}/cert", json={"auto_renew": False}).status_code == 202
    failed = wait_for(
        lambda: _domain(c, inst["id"], d["id"]),
        lambda x: (x.get("certificate") or {}).get("status") == "failed",
        30,
    )
    cert = failed["certificate"]
    assert "urn:ietf:params:acme:error" in cert["last_error"] and host in cert["last_error"], cert
    assert cert["auto_renew"] is False and cert["attempts"] == 1 and failed["tls_enabled"] is False

    # Created with tls_enabled, a domain gets its certificate as soon as the re-check verifies it.
    auto_host = stand.host("auto")
    auto = c.post(
        f"/v1/instances/{inst['id']}/domains", json={"hostname": auto_host, "tls_enabled": True}
    ).json()
    stand.dns.zone.set_txt(auto["txt_record"], auto["verify_token"])
    issued = wait_for(
        lambda: _domain(c, inst["id"], auto["id"]),
        lambda x: (x.get("certificate") or {}).get("status") == "issued" and x["tls_enabled"],
        30,
    )
    assert issued["verified"] and issued["cert_expiry"]
    assert c.delete(f"/v1/domains/{auto['id']}").status_code == 204

    # What the workers changed is audited with the network service as the actor.
    def audited(resource: str) -> set[tuple[str, str, str]]:
        items = (
            stand.mesh.admin()
            .get("/v1/admin/audit", params={"tenant_id": tenant.id, "resource": resource})
            .json()["items"]
        )
        return {(e["action"], e["outcome"], e["actor_type"], e["reason"]) for e in items}

    assert ("verify", "success", "system", "") in audited("domain")
    assert ("issue", "failure", "system", "AcmeRefused") in audited("certificate")
    assert ("provision", "success", "api_key", "") in audited("certificate")
