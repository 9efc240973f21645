"""The ACME driver: certificates through RFC 8555 with the `acme` library.

One account per directory (its key kept envelope-encrypted by the caller's `AccountStore`), then
per certificate: a new order for the hostname, its HTTP-01 challenges answered through the
`Responder` (the ingress serves the key authorizations), a CSR for a fresh P-256 key, finalize,
and the chain. The `acme` client is synchronous (requests): every network step runs in a thread.

A failure is an `AcmeFailure`: `definitive` when the CA refused (its problem document is the
message, e.g. the validation error), else a transient one (the CA unreachable, a timeout) that
is worth retrying as is.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

log = logging.getLogger("ctrlmesh.network.acme")

USER_AGENT = "ctrlmesh-network"


class AcmeFailure(Exception):
    def __init__(self, message: str, *, definitive: bool):
        super().__init__(message)
        self.message = message
        self.definitive = definitive


@dataclass(frozen=True)
class Issued:
    chain_pem: str
    key_pem: str
    issuer: str
    serial: str
    not_before: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True)
class Account:
    key_pem: str
    uri: str


class AccountStore(Protocol):
    async def load(self, directory: str) -> Account | None: ...
    async def save(self, directory: str, account: Account) -> None: ...


class Responder(Protocol):
    """Serves HTTP-01 answers at http://<hostname>/.well-known/acme-challenge/<token>."""

    async def publish(self, hostname: str, token: str, key_authorization: str) -> None: ...
    async def withdraw(self, tokens: list[str]) -> None: ...


def describe(cert_pem: str) -> tuple[str, str, dt.datetime, dt.datetime]:
    """(issuer, serial hex, not_before, not_after) of the leaf of a PEM chain."""
    leaf = x509.load_pem_x509_certificates(cert_pem.encode())[0]
    names = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = str(names[0].value) if names else leaf.issuer.rfc4514_string()
    return issuer, format(leaf.serial_number, "x"), leaf.not_valid_before_utc, leaf.not_valid_after_utc


def _problem(err: Exception) -> str:
    """The CA's words for a failure, without our stack or hosts."""
    if isinstance(err, errors.ValidationError):
        parts = []
        for authzr in err.failed_authzrs:
            for ch in authzr.body.challenges:
                if ch.error is not None:
                    parts.append(
                        f"{authzr.body.identifier.value}: {ch.error.typ} {ch.error.detail or ''}".strip()
                    )
        return "validation failed: " + ("; ".join(parts) or "no detail from the CA")
    if isinstance(err, messages.Error):
        return f"{err.typ} {err.detail or ''}".strip()
    return str(err) or type(err).__name__


class AcmeIssuer:
    def __init__(
        self,
        directory: str,
        *,
        email: str = "",
        ca_bundle: Path | None = None,
        accounts: AccountStore,
        timeout: dt.timedelta = dt.timedelta(seconds=90),
    ):
        self.directory = directory
        self.email = email
        self.ca_bundle = ca_bundle
        self.accounts = accounts
        self.timeout = timeout
        self._account_lock = asyncio.Lock()

    # -- the account -----------------------------------------------------------------------------

    def _connect(self, account: Account) -> client.ClientV2:
        key = serialization.load_pem_private_key(account.key_pem.encode(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        net = client.ClientNetwork(
            jose.JWKRSA(key=key),
            user_agent=USER_AGENT,
            # requests reads `verify` as a CA bundle path too (Pebble's private root).
            verify_ssl=str(self.ca_bundle) if self.ca_bundle else True,  # type: ignore[arg-type]
            timeout=30,
        )
        acme = client.ClientV2(client.ClientV2.get_directory(self.directory, net), net)
        if account.uri:
            net.account = messages.RegistrationResource(body=messages.Registration(), uri=account.uri)
        return acme

    def _register(self, acme: client.ClientV2) -> str:
        reg = messages.NewRegistration.from_data(email=self.email or None, terms_of_service_agreed=True)
        try:
            return str(acme.new_account(reg).uri)
        except errors.ConflictError as existing:
            # The key already has an account at this CA: use it.
            uri = str(existing)
            acme.net.account = messages.RegistrationResource(body=messages.Registration(), uri=uri)
            return uri

    async def _client(self) -> client.ClientV2:
        async with self._account_lock:
            account = await self.accounts.load(self.directory)
            if account is None:
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode()
                account = Account(pem, "")
            acme = await asyncio.to_thread(self._connect, account)
            if not account.uri:
                uri = await asyncio.to_thread(self._register, acme)
                await self.accounts.save(self.directory, Account(account.key_pem, uri))
            return acme

    # -- one certificate -----------------------------------------------------------------------

    async def issue(self, hostname: str, responder: Responder) -> Issued:
        try:
            return await self._issue(hostname, responder)
        except AcmeFailure:
            raise
        except (messages.Error, errors.ValidationError) as err:
            raise AcmeFailure(_problem(err), definitive=True) from err
        except errors.TimeoutError as err:
            raise AcmeFailure("the ACME order did not complete in time", definitive=False) from err
        except Exception as err:
            log.warning("ACME issuance for %s failed", hostname, exc_info=True)
            raise AcmeFailure(
                f"the ACME server could not be reached ({type(err).__name__})", definitive=False
            ) from err

    async def _issue(self, hostname: str, responder: Responder) -> Issued:
        acme = await self._client()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        csr = crypto_util.make_csr(key_pem, [hostname])
        try:
            order = await asyncio.to_thread(acme.new_order, csr)
        except messages.Error as err:
            if err.typ != "urn:ietf:params:acme:error:accountDoesNotExist":
                raise
            # The CA forgot the account (a reset test CA): register the same key again.
            acme.net.account = None
            uri = await asyncio.to_thread(self._register, acme)
            await self.accounts.save(self.directory, Account(_account_pem(acme), uri))
            order = await asyncio.to_thread(acme.new_order, csr)
        answers: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse]] = []
        tokens: list[str] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                challb = next(
                    (c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)), None
                )
                if challb is None:
                    raise AcmeFailure("the CA offered no http-01 challenge", definitive=True)
                response, validation = challb.response_and_validation(acme.net.key)
                token = challb.chall.encode("token")
                await responder.publish(authz.body.identifier.value, token, validation)
                tokens.append(token)
                answers.append((challb, response))
            for challb, response in answers:
                await asyncio.to_thread(acme.answer_challenge, challb, response)
            # The acme library compares against naive local time.
            deadline = dt.datetime.now() + self.timeout
            order = await asyncio.to_thread(acme.poll_and_finalize, order, deadline)
        finally:
            if tokens:
                await responder.withdraw(tokens)
        chain = order.fullchain_pem
        issuer, serial, not_before, expires_at = describe(chain)
        return Issued(chain, key_pem.decode(), issuer, serial, not_before, expires_at)


def _account_pem(acme: client.ClientV2) -> str:
    key = acme.net.key
    assert isinstance(key, jose.JWKRSA)
    private = key.key
    assert isinstance(private, rsa.RSAPrivateKey)
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
