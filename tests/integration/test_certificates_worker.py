"""The certificate worker on real PostgreSQL (the network schema migrated by its own
migrations) and a real Pebble: issue, forced renewal, a failed renewal that keeps the served
certificate and backs off. HTTP-01 is answered by a small loopback server that reads the
challenges through `DomainInputs`, exactly what the ingress renders."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import select, text

from libs.crypto import Keyring
from libs.db import Database, make_engine, migrate
from libs.outbox import Outbox
from libs.timeutil import now
from services.network.domains import repository as repo
from services.network.domains.acme import AcmeIssuer
from services.network.domains.certificates import Certificates, DbAccounts, IngressResponder
from services.network.domains.inputs import DomainInputs
from services.network.domains.models import certificates
from services.network.models import outbox
from tests.fixtures.acme import Pebble
from tests.fixtures.dns import DnsServer
from tests.fixtures.mesh import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "network" / "migrations"


class StandInIngress:
    """Serves /.well-known/acme-challenge/<token> from DomainInputs.challenges, on loopback."""

    def __init__(self, db: Database, inputs: DomainInputs, port: int):
        self.db, self.inputs, self.port = db, inputs, port
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        token = line.split(" ")[1].rsplit("/", 1)[-1] if " " in line else ""
        async with self.db.session() as s:
            answers = {c.token: c.key_authorization for c in await self.inputs.challenges(s)}
        body = answers.get(token, "")
        status = "200 OK" if body else "404 Not Found"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
        )
        await writer.drain()
        writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    d = Database(make_engine(database_url, pool_size=4))
    await migrate(d.engine, "network", MIGRATIONS)
    async with d.engine.begin() as conn:
        await conn.execute(text("TRUNCATE network.certificates, network.domains, network.acme_challenges"))
    yield d
    await d.engine.dispose()


async def _domain(db: Database, dns: DnsServer) -> dict[str, Any]:
    host = f"w{os.urandom(3).hex()}.example.test"
    dns.zone.add_host(host)
    at = now()
    values = {
        "id": f"dom_{os.urandom(8).hex()}",
        "tenant_id": "ten_a",
        "account_id": "acct_a",
        "instance_id": "inst_a",
        "hostname": host,
        "verified": True,
        "verify_token": "t",
        "verified_at": at,
        "created_at": at,
        "updated_at": at,
    }
    async with db.session() as s:
        await repo.insert_domain(s, values)
    return values


async def _events(db: Database) -> list[dict[str, Any]]:
    async with db.session() as s:
        return [dict(r) for r in (await s.execute(select(outbox).order_by(outbox.c.seq))).mappings()]


async def test_issue_renew_and_failed_renewal(
    db: Database, pebble_factory: Callable[[int], Pebble], dns_server: DnsServer
) -> None:
    """A pending certificate is issued (stored encrypted, served decrypted through
    DomainInputs); a forced renewal replaces it; a renewal the CA cannot be reached for keeps the
    issued one served, shows the error and backs off."""
    port = free_port()
    pebble = pebble_factory(port)
    keyring = Keyring({"k1": os.urandom(32)}, "k1")
    inputs = DomainInputs(keyring)
    ingress = StandInIngress(db, inputs, port)
    await ingress.start()
    wakes: list[int] = []
    issuer = AcmeIssuer(pebble.directory, ca_bundle=pebble.ca_bundle, accounts=DbAccounts(db, keyring))
    certs = Certificates(
        db,
        Outbox(outbox, db),
        keyring,
        issuer,
        IngressResponder(db, lambda: wakes.append(1), f"http://127.0.0.1:{port}"),
        renew_before=timedelta(hours=2),
        interval=timedelta(seconds=1),
        retry=timedelta(seconds=30),
        wake=lambda: wakes.append(1),
    )
    d = await _domain(db, dns_server)
    async with db.session() as s:
        row = await repo.get_domain(s, "ten_a", d["id"])
    assert row is not None

    pending = await certs.request(row, auto_renew=True)
    assert pending.state == "pending"
    await certs.runner.run(("ten_a", pending.id))
    issued = await certs.get("ten_a", pending.id)
    assert issued is not None and issued.state == "issued" and "Pebble" in issued.issuer, issued
    async with db.session() as s:
        served = await inputs.certificates(s)
        dom = await repo.get_domain(s, "ten_a", d["id"])
        raw = (await s.execute(select(certificates.c.key_enc, certificates.c.chain_enc))).one()
        assert await inputs.challenges(s) == []  # withdrawn after the order
    assert dom is not None and dom.tls_enabled and dom.cert_expiry == issued.expires_at
    assert [c.hostname for c in served] == [d["hostname"]]
    leaf = x509.load_pem_x509_certificates(served[0].cert_pem.encode())[0]
    assert format(leaf.serial_number, "x") == issued.serial and "PRIVATE KEY" in served[0].key_pem
    assert all(b"PRIVATE KEY" not in base64.b64decode(v) for v in raw)  # encrypted at rest
    assert wakes

    # Pebble's hour of lifetime is inside the two-hour renewal window: the pass renews it.
    await certs.due_pass()
    await certs.runner.run(("ten_a", pending.id))
    renewed = await certs.get("ten_a", pending.id)
    assert renewed is not None and renewed.serial != issued.serial and renewed.renewed_at is not None
    assert renewed.state == "issued" and renewed.attempts == 0 and renewed.last_error == ""

    # The CA gone: the renewal fails, the renewed certificate stays served, the next try waits.
    issuer.directory = f"https://127.0.0.1:{free_port()}/dir"
    await certs.due_pass()
    await certs.runner.run(("ten_a", pending.id))
    after = await certs.get("ten_a", pending.id)
    assert after is not None and after.state == "issued" and after.serial == renewed.serial
    assert after.attempts == 1 and "could not be reached" in after.last_error
    assert after.next_attempt_at is not None and after.next_attempt_at > now() + timedelta(seconds=20)
    async with db.session() as s:
        assert [c.hostname for c in await inputs.certificates(s)] == [d["hostname"]]
        assert await repo.due_certs(s, now(), now() + timedelta(hours=2)) == []

    # Left unrenewed past its expiry, the domain is no longer TLS-enabled nor served.
    async with db.session() as s:
        await s.execute(certificates.update().values(expires_at=now() - timedelta(seconds=1)))
        await s.execute(
            repo.domains.update()
            .where(repo.domains.c.id == d["id"])
            .values(cert_expiry=now() - timedelta(seconds=1))
        )
    await certs.due_pass()
    async with db.session() as s:
        gone = await repo.get_domain(s, "ten_a", d["id"])
        assert gone is not None and not gone.tls_enabled and await inputs.certificates(s) == []

    types = [e["type"] for e in await _events(db)]
    assert types == ["certificate.issued", "certificate.renewed", "certificate.failed"], types
    failed = (await _events(db))[-1]
    assert (
        failed["data"]["renewal"] is True
        and failed["tenant_id"] == "ten_a"
        and failed["account_id"] == "acct_a"
    )
    assert ingress.server is not None
    ingress.server.close()
