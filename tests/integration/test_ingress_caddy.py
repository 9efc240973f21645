"""The ingress against a real Caddy and a real PostgreSQL: what the network schema and the domains
package's inputs say is what Caddy serves — a verified domain over HTTPS with the certificate
handed over (SNI, checked by curl against that certificate), ACME HTTP-01 answers on any host,
no reload when nothing changed, and a restarted Caddy refilled on the next pass."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.ext.asyncio import AsyncSession

from libs.db import Database, make_engine, migrate
from libs.outbox import Outbox
from libs.timeutil import now
from services.network import repository as repo
from services.network.ingress.caddy import CaddyAdmin
from services.network.ingress.ingress import Ingress
from services.network.ingress.inputs import Challenge, HostBinding, TlsCertificate
from services.network.ingress.render import Listen
from services.network.models import SCHEMA, outbox
from tests.fixtures.caddy import Caddy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "network" / "migrations"
HOST = "app.example.test"


def self_signed(hostname: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    t = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - dt.timedelta(minutes=1))
        .not_valid_after(t + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


class Inputs:
    """A stand-in for the domains package: one verified domain, its certificate, one challenge."""

    def __init__(self, instance_id: str, tenant_id: str, cert: tuple[str, str]):
        self.hosts = [HostBinding(HOST, instance_id, tenant_id)]
        self.certs = [TlsCertificate(HOST, *cert)]
        self.challenges_ = [Challenge("tok-1", "tok-1.thumbprint")]

    async def verified_hosts(self, session: AsyncSession) -> list[HostBinding]:
        return self.hosts

    async def certificates(self, session: AsyncSession) -> list[TlsCertificate]:
        return self.certs

    async def challenges(self, session: AsyncSession) -> list[Challenge]:
        return self.challenges_


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"upstream saw {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
async def ingress(database_url: str, caddy: Caddy) -> AsyncIterator[Ingress]:
    engine = make_engine(database_url)
    await migrate(engine, SCHEMA, MIGRATIONS)
    admin = CaddyAdmin(caddy.admin_url)
    listen = Listen("127.0.0.1", caddy.http_port, caddy.https_port, admin.listen, "localhost")
    ing = Ingress(Outbox(outbox, Database(engine)), admin, None, None, listen, interval=1, resync_interval=10)  # type: ignore[arg-type]
    yield ing
    await admin.close()
    await engine.dispose()


async def test_verified_domain_served_over_https_with_the_handed_certificate(
    ingress: Ingress, caddy: Caddy, upstream: int, tmp_path: Path
) -> None:
    """Caddy serves the verified domain on HTTPS with the certificate the inputs hand over, answers
    the HTTP-01 challenge on any host, and is not reloaded when nothing changed."""
    async with ingress.outbox.session() as s:
        await repo.upsert_instance(
            s,
            {
                "instance_id": "inst_tls",
                "tenant_id": "ten_tls",
                "account_id": "acct",
                "tenant_slug": "tls",
                "slug": "web",
                "state": "running",
                "main_service": "main",
                "ports": [{"container_port": 8080, "protocol": "tcp"}],
                "upstreams": [{"service": "main", "container_port": 8080, "host_port": upstream}],
                "updated_at": now(),
            },
        )
    cert = self_signed(HOST)
    (tmp_path / "ca.pem").write_text(cert[0])
    ingress.use_inputs(Inputs("inst_tls", "ten_tls", cert))
    assert await ingress.apply() is True
    assert await ingress.apply() is False

    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "5",
        "--cacert", str(tmp_path / "ca.pem"),
        "--resolve", f"{HOST}:{caddy.https_port}:127.0.0.1",
        f"https://{HOST}:{caddy.https_port}/hello",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await curl.communicate()
    assert curl.returncode == 0, stderr.decode()
    assert stdout.decode() == "upstream saw /hello"

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{caddy.http_port}") as h:
        r = await h.get("/.well-known/acme-challenge/tok-1", headers={"Host": "anything.example"})
        assert (r.status_code, r.text, r.headers["content-type"]) == (200, "tok-1.thumbprint", "text/plain")
        r = await h.get("/x", headers={"Host": HOST})
        assert r.text == "upstream saw /x"
        assert (await h.get("/x", headers={"Host": "web.tls.localhost"})).text == "upstream saw /x"


async def test_restarted_caddy_is_refilled(ingress: Ingress, caddy: Caddy) -> None:
    """A Caddy killed and started again holds nothing; the next pass loads the whole config."""
    assert await ingress.apply() in (True, False)
    caddy.kill()
    caddy.start()
    assert await CaddyAdmin(caddy.admin_url).config() != await ingress.desired()
    assert await ingress.apply() is True
    assert await ingress.caddy.config() == await ingress.desired()


async def test_an_unreadable_certificate_does_not_block_the_config(ingress: Ingress, caddy: Caddy) -> None:
    """A certificate Caddy could not load is left out (Caddy would refuse the whole config, and
    with it every other change): the rest is loaded and served."""
    inputs = Inputs("inst_tls", "ten_tls", ("not a certificate", "not a key"))
    # A readable pair that does not match is refused by Caddy too.
    inputs.certs.append(
        TlsCertificate("other.example.test", self_signed("other.example.test")[0], self_signed("x")[1])
    )
    inputs.hosts.append(HostBinding("other.example.test", "inst_tls", "ten_tls"))
    ingress.use_inputs(inputs)
    assert await ingress.apply() is True
    config = await ingress.caddy.config()
    assert "tls" not in config["apps"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{caddy.http_port}") as h:
        r = await h.get("/y", headers={"Host": "other.example.test"})
    assert r.text == "upstream saw /y"
