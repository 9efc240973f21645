"""The ACME driver against a real Pebble: account, order, HTTP-01 answered on loopback, CSR,
finalize; and the CA's refusal surfacing as a definitive failure with its problem text."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.network.domains.acme import Account, AcmeFailure, AcmeIssuer
from tests.fixtures.acme import CERT_LIFETIME, Pebble
from tests.fixtures.dns import DnsServer
from tests.fixtures.mesh import free_port

pytestmark = pytest.mark.timeout(60)


class MemoryAccounts:
    def __init__(self) -> None:
        self.saved: dict[str, Account] = {}

    async def load(self, directory: str) -> Account | None:
        return self.saved.get(directory)

    async def save(self, directory: str, account: Account) -> None:
        self.saved[directory] = account


class LoopbackResponder:
    """Answers HTTP-01 from a tiny HTTP server on the port Pebble validates against."""

    def __init__(self, port: int):
        self.answers: dict[str, str] = {}
        self.withdrawn: list[str] = []
        answers = self.answers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.path.rsplit("/", 1)[-1]
                body = answers.get(token)
                self.send_response(200 if body else 404)
                self.end_headers()
                if body:
                    self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    async def publish(self, hostname: str, token: str, key_authorization: str) -> None:
        self.answers[token] = key_authorization

    async def withdraw(self, tokens: list[str]) -> None:
        for t in tokens:
            self.answers.pop(t, None)
        self.withdrawn.extend(tokens)


@pytest.fixture(scope="module")
def pebble_and_responder(
    pebble_factory: Callable[[int], Pebble],
) -> Iterator[tuple[Pebble, LoopbackResponder]]:
    port = free_port()
    responder = LoopbackResponder(port)
    yield pebble_factory(port), responder
    responder.server.shutdown()


def test_issues_a_certificate_through_http01(
    pebble_and_responder: tuple[Pebble, LoopbackResponder], dns_server: DnsServer
) -> None:
    """Pebble issues a certificate for a hostname whose HTTP-01 answer the responder serves; the
    account is registered once and reused for the second order."""
    pebble, responder = pebble_and_responder
    dns_server.zone.add_host("acme-ok.example.test")
    accounts = MemoryAccounts()
    issuer = AcmeIssuer(
        pebble.directory, email="ops@example.test", ca_bundle=pebble.ca_bundle, accounts=accounts
    )
    t0 = time.monotonic()
    issued = asyncio.run(issuer.issue("acme-ok.example.test", responder))
    took = time.monotonic() - t0
    assert "BEGIN CERTIFICATE" in issued.chain_pem and "PRIVATE KEY" in issued.key_pem
    assert "Pebble" in issued.issuer
    lifetime = issued.expires_at - issued.not_before
    assert abs(lifetime - CERT_LIFETIME).total_seconds() < 120
    assert responder.withdrawn and not responder.answers
    uri = accounts.saved[pebble.directory].uri
    assert uri.startswith("https://127.0.0.1")
    again = asyncio.run(issuer.issue("acme-ok.example.test", responder))
    assert again.serial != issued.serial and accounts.saved[pebble.directory].uri == uri
    print(f"issue with Pebble: {took:.2f} s")


def test_unresolvable_hostname_is_a_definitive_failure(
    pebble_and_responder: tuple[Pebble, LoopbackResponder],
) -> None:
    """A hostname Pebble cannot resolve fails validation; the failure carries the CA's problem."""
    pebble, responder = pebble_and_responder
    issuer = AcmeIssuer(pebble.directory, ca_bundle=pebble.ca_bundle, accounts=MemoryAccounts())
    with pytest.raises(AcmeFailure) as err:
        asyncio.run(issuer.issue("acme-missing.example.test", responder))
    assert err.value.definitive
    assert (
        "acme-missing.example.test" in err.value.message and "urn:ietf:params:acme:error" in err.value.message
    )


def test_unreachable_directory_is_transient() -> None:
    """A directory nobody serves is a transient failure (worth retrying), never definitive."""
    issuer = AcmeIssuer(f"https://127.0.0.1:{free_port()}/dir", accounts=MemoryAccounts())

    class Never:
        async def publish(self, hostname: str, token: str, key_authorization: str) -> None:
            raise AssertionError("no order without a directory")

        async def withdraw(self, tokens: list[str]) -> None:
            pass

    with pytest.raises(AcmeFailure) as err:
        asyncio.run(issuer.issue("x.example.test", Never()))
    assert not err.value.definitive
