"""Secret canaries: known secrets go through every path that handles them, then every place the
platform writes to is searched for them: zero hits.

The canaries are the tenant's PG passwords (before and after a rotation, and a wrong one a user
typed), API key tokens (account and tenant keys, one sent as `?token=`, one revoked, one that
was never valid), instance secret values (env and file, set, rotated and injected), and the
platform's own secrets (the internal signing secret, the envelope-encryption KEK, the embedded
PostgreSQL superuser password, the PG Gateway's TLS private keys), and the certificate keys: the
private key of a domain certificate issued by Pebble (a real ACME CA) and the ACME account key,
both read back from their encrypted rows with the KEK. The sinks are the captured output of every process at DEBUG level, every log file the
mesh wrote, the OTLP trace export, every `/metrics` page, a `pg_dumpall` of the control-plane
PostgreSQL and every API answer about the secrets.

The instances' secret values (env and file) are set, rotated and injected into a real container
by a rollout, and every answer of the API about them is searched too. To cover a new kind of
secret, add an exercise that sends it through its routes and adds its canaries.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest

from libs.crypto import Keyring
from libs.embedded_pg import PASSWORD_FILE, find_pg_bindir
from libs.settings import SERVICES
from tests.fixtures.acme import Pebble
from tests.fixtures.api import create_account, unique
from tests.fixtures.dns import DnsServer
from tests.fixtures.docker import engine_containers
from tests.fixtures.instances import MESH_ENV, create_running, make_tenant, wait_deployment, wait_for
from tests.fixtures.mesh import Mesh, free_port
from tests.fixtures.otlp import Collector

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@dataclass
class Canaries:
    """Secret values by name; each is searched for in every sink."""

    values: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, value: str) -> str:
        assert len(value) >= 8, f"canary {name} too short to search for: {value!r}"
        self.values[name] = value
        return value


@pytest.fixture(scope="module")
def canary_mesh(
    module_mesh_builder: Callable[..., Mesh],
    docker_host: str,
    pebble_factory: Callable[[int], Pebble],
    dns_server: DnsServer,
) -> Iterator[tuple[Mesh, Collector]]:
    """A private mesh at DEBUG log level, exporting traces to an in-test OTLP receiver, with the
    instances service on the test engine (secret values go through a real rollout) and Pebble as
    its ACME CA behind a real DNS server (a certificate is really issued)."""
    collector = Collector()
    http = free_port()
    pebble = pebble_factory(http)
    m = module_mesh_builder(
        CTRLMESH_LOG_LEVEL="DEBUG",
        CTRLMESH_IDLE_TIMEOUT="60s",
        DOCKER_HOST=docker_host,
        **MESH_ENV,
        **collector.start(),
        CTRLMESH_INGRESS_HTTP_PORT=str(http),
        CTRLMESH_INGRESS_HTTPS_PORT=str(free_port()),
        CTRLMESH_INGRESS_ADMIN_PORT=str(free_port()),
        CTRLMESH_DNS_RESOLVER=dns_server.address,
        CTRLMESH_ACME_DIRECTORY=pebble.directory,
        CTRLMESH_ACME_CA_BUNDLE=str(pebble.ca_bundle),
        CTRLMESH_ACME_EMAIL="ops@example.test",
        CTRLMESH_ACME_RETRY="1s",
    )
    m.env["DOCKER_HOST"] = docker_host
    DNS.append(dns_server)
    yield m, collector
    collector.stop()


# The test zone's server, for the certificate exercise (exercises take the mesh and canaries only).
DNS: list[DnsServer] = []


def _dsn(mesh: Mesh, user: str, password: str, db: str = "app") -> str:
    port = mesh.env["CTRLMESH_PG_PORT"]
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@localhost:{port}/{db}?sslmode=require"


def _login_fails(mesh: Mesh, user: str, password: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(_dsn(mesh, user, password), connect_timeout=30).close()


def _login_works(mesh: Mesh, user: str, password: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(_dsn(mesh, user, password), connect_timeout=30) as conn:
                assert conn.execute("select current_user").fetchone() == (user,)
                return
        except psycopg.OperationalError as exc:
            # The Gateway caches looked-up credentials for 2 s, so a rotated password may lag.
            if "password authentication failed" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def exercise_tenant_credentials_and_keys(mesh: Mesh, canaries: Canaries) -> None:
    """Create an account, a tenant (its PG password), a tenant key; read the credentials; log in
    through the PG Gateway (booting the compute), fail a login, rotate, log in with the new one,
    fail with the old one; use keys by header and by `?token=`; revoke a key; try a bad key."""
    _, account_key = create_account(mesh)
    canaries.add("account API key", account_key)
    acct = mesh.client(account_key)
    name = unique("canary")
    t = acct.post("/v2/tenants", json={"name": name})
    assert t.status_code == 201, t.text
    user, first = t.json()["pg_user"], canaries.add("PG password", t.json()["pg_password"])
    k = acct.post(
        "/v2/api-keys",
        json={"name": "canary", "scope": "tenant", "tenant": name, "permissions": {"can_create_db": True}},
    )
    assert k.status_code == 201, k.text
    tenant_key = canaries.add("tenant API key", k.json()["key"])
    tc = mesh.client(tenant_key)
    assert tc.get(f"/v2/tenants/{name}/credentials").json()["pg_password"] == first
    assert tc.post(f"/v2/tenants/{name}/dbs", json={"name": "app", "size": "L1"}).status_code == 201
    _login_works(mesh, user, first)
    _login_fails(mesh, user, canaries.add("mistyped PG password", first[:-4] + secrets.token_hex(2)))
    rotated = acct.post(f"/v2/tenants/{name}/credentials/rotate")
    assert rotated.status_code == 200, rotated.text
    second = canaries.add("rotated PG password", rotated.json()["pg_password"])
    assert second != first
    _login_works(mesh, user, second)
    time.sleep(2.5)  # past the Gateway's credential cache: the old password is refused, not cached
    _login_fails(mesh, user, first)
    # The SSE route takes the key as ?token= (EventSource cannot set headers): the URL carries it.
    try:
        with httpx.stream(
            "GET",
            f"{mesh.base_url}/v2/events",
            params={"token": tenant_key},
            timeout=httpx.Timeout(5, read=1),
        ) as r:
            assert r.status_code == 200
            for _ in r.iter_raw():
                pass
    except httpx.ReadTimeout:
        pass
    revoked_key = acct.post("/v2/api-keys", json={"name": "gone", "scope": "account"}).json()["key"]
    canaries.add("revoked API key", revoked_key)
    rid = mesh.client(revoked_key).get("/v2/api-keys/me").json()["id"]
    assert acct.delete(f"/v2/api-keys/{rid}").status_code == 204
    assert mesh.client(revoked_key).get("/v2/api-keys/me").status_code == 401
    bogus = canaries.add("invalid API key", "cm_" + secrets.token_urlsafe(24))
    assert mesh.client(bogus).get("/v2/tenants").status_code == 401


def exercise_secret_values(mesh: Mesh, canaries: Canaries) -> None:
    """Secret values (env and file) set on a real instance with `?rollout=true`, a new version
    of one, the rollout that injects them (checked inside the container), then every read of the
    instance, its secrets, releases and deployments: each answer is kept for the search."""
    t = make_tenant(mesh, {"max_instances": 2, "max_cpu_millis": 4000, "max_memory_mb": 4096})
    c = t.client()
    iid = create_running(c)["id"]
    env_value = canaries.add("secret value (env)", "s3cr3t-" + secrets.token_hex(12))
    file_value = canaries.add("secret value (file)", "f1l3-" + secrets.token_hex(12))
    rotated = canaries.add("secret value (rotated)", "r0t4t3d-" + secrets.token_hex(12))
    url = f"/v1/instances/{iid}/secrets"
    answers = [
        c.post(url, json={"key": "CANARY", "value": env_value}),
        c.post(url, json={"key": "canary.txt", "value": file_value, "type": "file"}),
        c.post(url, json={"key": "CANARY", "value": rotated}, params={"rollout": "true"}),
    ]
    assert [r.status_code for r in answers] == [201, 201, 201], [r.text for r in answers]
    dep = wait_deployment(c, answers[-1].json()["deployment_id"], ("succeeded", "failed"))
    assert dep["state"] == "succeeded", dep
    inst = c.get(f"/v1/instances/{iid}").json()
    cid = engine_containers(mesh.env["DOCKER_HOST"], iid)[0]
    seen = subprocess.run(
        ["docker", "exec", cid, "sh", "-c", "echo $CANARY; cat /run/secrets/canary.txt"],
        env=dict(os.environ, DOCKER_HOST=mesh.env["DOCKER_HOST"]),
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    assert seen == [rotated, file_value], "the values did not reach the container: the search proves less"
    for path in (
        url,
        f"/v1/instances/{iid}",
        f"/v1/instances/{iid}/releases",
        f"/v1/instances/{iid}/deployments",
    ):
        answers.append(c.get(path))
    answers.append(c.get(f"/v1/releases/{inst['current_release']}"))
    answers.append(c.delete(f"{url}/CANARY"))
    API_ANSWERS.extend(
        f"{r.request.method} {r.request.url.path} → {r.status_code}\n{r.text}" for r in answers
    )


def exercise_certificates(mesh: Mesh, canaries: Canaries) -> None:
    """A domain verified through DNS gets a certificate from Pebble (which also registers the
    platform's ACME account); the certificate's private key and the account key are read back
    from their encrypted rows with the KEK, and every answer about the domain is kept."""
    t = make_tenant(
        mesh, {"max_instances": 2, "max_cpu_millis": 4000, "max_memory_mb": 4096, "max_domains": 1}
    )
    c = t.client()
    iid = create_running(c)["id"]
    host = f"{unique('canary').replace('_', '-')}.example.test"
    DNS[0].zone.add_host(host)
    r = c.post(f"/v1/instances/{iid}/domains", json={"hostname": host})
    assert r.status_code == 201, r.text
    d = r.json()
    DNS[0].zone.set_txt(d["txt_record"], d["verify_token"])
    answers = [r, c.post(f"/v1/domains/{d['id']}/verify", json={})]
    assert answers[-1].status_code == 200, answers[-1].text
    answers.append(c.post(f"/v1/domains/{d['id']}/cert", json={}))
    assert answers[-1].status_code == 202, answers[-1].text
    cert_id = answers[-1].json()["id"]

    def listed() -> dict[str, Any]:
        items = c.get(f"/v1/instances/{iid}/domains").json()["items"]
        return next(x for x in items if x["id"] == d["id"])

    wait_for(listed, lambda x: (x.get("certificate") or {}).get("status") == "issued", 60)
    answers.append(c.get(f"/v1/instances/{iid}/domains"))
    API_ANSWERS.extend(
        f"{r.request.method} {r.request.url.path} → {r.status_code}\n{r.text}" for r in answers
    )
    ring = Keyring.from_b64(_kek(mesh), "k1")
    with psycopg.connect(_control_plane_dsn(mesh)) as conn:
        key_enc = conn.execute(
            "select key_enc from network.certificates where id = %s", (cert_id,)
        ).fetchone()
        accounts = conn.execute("select directory, key_enc from network.acme_accounts").fetchall()
    assert key_enc is not None and key_enc[0] and accounts, "nothing to read back: the search proves less"
    _add_pem(
        canaries,
        "issued certificate's private key",
        ring.decrypt_str(key_enc[0], aad=f"certificate:{cert_id}"),
    )
    for directory, enc in accounts:
        _add_pem(
            canaries,
            f"ACME account key ({directory})",
            ring.decrypt_str(enc, aad=f"acme-account:{directory}"),
        )


def _add_pem(canaries: Canaries, name: str, pem: str) -> None:
    """Key material from a PEM body, in the form a leak would most likely copy. Past the first 48
    characters: that much is the fixed ASN.1 header every P-256 PKCS#8 key shares (a canary
    made of it would match any such key, not this one); after it comes the private scalar."""
    body = "".join(ln for ln in pem.splitlines() if ln and not ln.startswith("-----"))
    assert len(body) >= 96, f"{name} is not a PEM key"
    canaries.add(name, body[48:96])


def _kek(mesh: Mesh) -> str:
    return mesh.env.get("CTRLMESH_KEK") or (mesh.data_dir / "secrets" / "kek").read_text().strip()


def _control_plane_dsn(mesh: Mesh) -> str:
    port = mesh.env["CTRLMESH_EMBEDDED_PG_PORT"]
    return f"postgresql://ctrlmesh:{quote(_pg_password(mesh), safe='')}@127.0.0.1:{port}/ctrlmesh"


# Every answer the exercises kept (searched like the other sinks).
API_ANSWERS: list[str] = []


def platform_secrets(mesh: Mesh, canaries: Canaries) -> None:
    """The platform's own secrets, read from where they live on disk."""
    canaries.add("internal signing secret", mesh.internal_secret.decode())
    canaries.add("envelope-encryption KEK", _kek(mesh))
    canaries.add("admin API key", mesh.admin_key)
    canaries.add("control-plane PG superuser password", _pg_password(mesh))
    for key_file in sorted((mesh.data_dir / "pggateway").glob("*.key")):
        _add_pem(canaries, f"PG Gateway TLS key {key_file.name}", key_file.read_text())


EXERCISES = [exercise_tenant_credentials_and_keys, exercise_secret_values, exercise_certificates]


def _cluster_dir(mesh: Mesh) -> Path:
    marker = mesh.data_dir / "pg" / "CLUSTER_LOCATION"
    return Path(marker.read_text().strip()) if marker.exists() else mesh.data_dir / "pg"


def _pg_password(mesh: Mesh) -> str:
    return (_cluster_dir(mesh) / PASSWORD_FILE).read_text().rstrip("\n")


def sink_logs(mesh: Mesh) -> dict[str, str]:
    """The captured output of every process, and every log file the mesh wrote anywhere."""
    # The one deliberate display: on first start the launcher shows the new admin key once, on
    # its own banner line (the operator's terminal), as the README documents.
    output = re.sub(r"(?m)^\s*admin API key:\s+\S+\s+\(shown once;.*$", "", "".join(mesh.output))
    out = {"launcher output (every process)": output}
    roots = [mesh.data_dir, _cluster_dir(mesh)]
    computes = mesh.data_dir / "COMPUTES_LOCATION"
    if computes.exists():
        roots.append(Path(computes.read_text().strip()))
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and (path.suffix == ".log" or "log" in path.parent.name):
                out[str(path)] = path.read_text(errors="replace")
    assert len(out) >= 2, "no log file found: the search would prove nothing"
    return out


def sink_metrics(mesh: Mesh) -> dict[str, str]:
    """Every Prometheus page: the edge's, each service's, the PG Gateway's."""
    offset = int(mesh.env["CTRLMESH_METRICS_PORT_OFFSET"])
    urls = {"edge": f"{mesh.base_url}/metrics"}
    for name in SERVICES:
        urls[name] = f"http://127.0.0.1:{int(mesh.env[f'CTRLMESH_{name.upper()}_PORT']) + offset}/metrics"
    urls["pggateway"] = f"http://127.0.0.1:{mesh.env['CTRLMESH_PG_METRICS_PORT']}/metrics"
    out = {}
    for name, url in urls.items():
        r = httpx.get(url, timeout=10)
        assert r.status_code == 200 and "# TYPE" in r.text, (name, r.status_code)
        out[f"/metrics of {name}"] = r.text
    return out


def sink_traces(collector: Collector) -> dict[str, str]:
    """Every OTLP export request as sent (protobuf strings are raw UTF-8, so a search finds them)."""
    raw = b"".join(collector.raw)
    assert collector.spans, "no span was exported: the search would prove nothing"
    return {"OTLP trace export": raw.decode("utf-8", errors="replace")}


def sink_dump(mesh: Mesh) -> dict[str, str]:
    """A plain-text dump of every database of the control-plane PostgreSQL, roles included."""
    port = mesh.env["CTRLMESH_EMBEDDED_PG_PORT"]
    done = subprocess.run(
        [str(find_pg_bindir() / "pg_dumpall"), "-h", "127.0.0.1", "-p", port, "-U", "ctrlmesh"],
        env={"PGPASSWORD": _pg_password(mesh), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CREATE TABLE" in done.stdout and "api_keys" in done.stdout
    return {"pg_dumpall of the control plane": done.stdout}


def test_no_secret_appears_in_logs_traces_metrics_or_the_database_dump(canary_mesh):
    """After every secret-handling path ran, no canary is found in any sink."""
    mesh, collector = canary_mesh
    canaries = Canaries()
    for exercise in EXERCISES:
        exercise(mesh, canaries)
    platform_secrets(mesh, canaries)
    time.sleep(1.5)  # the span processor exports every 100 ms; logs are line-buffered
    sinks = {**sink_logs(mesh), **sink_metrics(mesh), **sink_traces(collector), **sink_dump(mesh)}
    assert API_ANSWERS, "no API answer was kept: the search would prove nothing"
    sinks["API answers"] = "\n".join(API_ANSWERS)
    assert len(canaries.values) >= 10
    hits = []
    for sink, text in sinks.items():
        for name, value in canaries.values.items():
            for form in {value, quote(value, safe="")}:
                if form in text:
                    at = text.index(form)
                    hits.append(f"{name} in {sink}: …{text[max(0, at - 120) : at + len(form) + 40]!r}…")
    assert not hits, "\n".join(hits)
