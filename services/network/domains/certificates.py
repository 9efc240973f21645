"""Certificates: requested by the API, issued and renewed by a worker through ACME.

A request records the desired state first (the domain's one certificate row, `pending`) and
answers at once; `KeyedRunner` drives each certificate through the issuer, and the periodic pass
picks up whatever is due: a pending certificate whose (backed-off) attempt time has come, and an
issued auto-renewing one whose remaining lifetime is below `renew_before`. A renewal keeps the
current certificate served until the new one is stored; the ingress then swaps it (Caddy's
config load is graceful: established connections keep their certificate).

Failures: the CA's refusal of a first issue is `failed` at once, with the CA's problem as
`last_error`; a transient failure (CA unreachable, timeout) is retried with doubling delays up to
`MAX_ATTEMPTS`. A failed renewal leaves the issued certificate served and shows its error,
attempts and next attempt on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx

from libs import ids
from libs.crypto import Keyring
from libs.db import Database
from libs.outbox import Outbox
from libs.reconcile import KeyedRunner, every
from libs.timeutil import now
from services.network.domains import audit, events
from services.network.domains import repository as repo
from services.network.domains.acme import Account, AcmeFailure, AcmeIssuer
from services.network.domains.repository import CertRow, DomainRow

log = logging.getLogger("ctrlmesh.network.certificates")

MAX_ATTEMPTS = 5
MAX_BACKOFF = timedelta(hours=6)
CHALLENGE_TTL = timedelta(minutes=10)


class DbAccounts:
    """The ACME account key per directory, envelope-encrypted in `acme_accounts`."""

    def __init__(self, db: Database, keyring: Keyring):
        self.db = db
        self.keyring = keyring

    async def load(self, directory: str) -> Account | None:
        async with self.db.session() as s:
            row = await repo.get_account(s, directory)
        if row is None:
            return None
        return Account(self.keyring.decrypt_str(row[0], aad=f"acme-account:{directory}"), row[1])

    async def save(self, directory: str, account: Account) -> None:
        enc = self.keyring.encrypt_str(account.key_pem, aad=f"acme-account:{directory}")
        async with self.db.session() as s:
            await repo.put_account(s, directory, enc, account.uri, now())


class IngressResponder:
    """Answers HTTP-01 through the ingress: the key authorization is stored (the ingress reads it
    through IngressInputs.challenges), the ingress is woken, and — before the CA is told to
    look — the answer is fetched through the ingress's HTTP port the way the CA will fetch it,
    so the CA never races the ingress's reload."""

    def __init__(self, db: Database, wake: Callable[[], None], self_check_url: str = "", wait: float = 15.0):
        self.db = db
        self.wake = wake
        self.self_check_url = self_check_url.rstrip("/")
        self.wait = wait

    async def publish(self, hostname: str, token: str, key_authorization: str) -> None:
        async with self.db.session() as s:
            await repo.put_challenge(s, token, key_authorization, hostname, now() + CHALLENGE_TTL)
        self.wake()
        if self.self_check_url:
            await self._served(hostname, token, key_authorization)

    async def withdraw(self, tokens: list[str]) -> None:
        """Stop answering; no reload of its own: the certificate stored next (or the next render)
        takes the answers off the ingress, so a renewal costs one config load fewer."""
        async with self.db.session() as s:
            await repo.drop_challenges(s, tokens)

    async def _served(self, hostname: str, token: str, key_authorization: str) -> None:
        url = f"{self.self_check_url}/.well-known/acme-challenge/{token}"
        deadline = asyncio.get_running_loop().time() + self.wait
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                try:
                    r = await http.get(url, headers={"Host": hostname})
                    if r.status_code == 200 and r.text.strip() == key_authorization:
                        return
                except httpx.HTTPError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    # The CA decides; its answer will say what it saw.
                    log.warning(
                        "the ingress does not serve the challenge of %s yet; asking the CA anyway", hostname
                    )
                    return
                await asyncio.sleep(0.1)


class Certificates:
    def __init__(
        self,
        db: Database,
        outbox: Outbox,
        keyring: Keyring,
        issuer: AcmeIssuer,
        responder: IngressResponder,
        *,
        renew_before: timedelta,
        interval: timedelta,
        retry: timedelta,
        wake: Callable[[], None],
        audit: audit.AuditSink | None = None,
    ):
        self.db = db
        self.outbox = outbox
        self.keyring = keyring
        self.issuer = issuer
        self.responder = responder
        self.renew_before = renew_before
        self.interval = interval
        self.retry = retry
        self.wake = wake
        self.audit = audit
        self.runner: KeyedRunner[tuple[str, str]] = KeyedRunner(
            "certificates", self.step, claim_key=lambda k: k[1]
        )

    # -- requests ----------------------------------------------------------------------------------

    async def request(self, d: DomainRow, *, auto_renew: bool) -> CertRow:
        """The domain's certificate, pending (a new one, or an issued/failed one re-requested);
        one already pending is answered as it is."""
        at = now()
        async with self.db.session() as s:
            cert = await repo.get_cert_of_domain(s, d.tenant_id, d.id, lock=True)
            if cert is None:
                cert_id = ids.new_id("cert")
                await repo.insert_cert(
                    s,
                    {
                        "id": cert_id,
                        "domain_id": d.id,
                        "tenant_id": d.tenant_id,
                        "account_id": d.account_id,
                        "hostname": d.hostname,
                        "state": "pending",
                        "auto_renew": auto_renew,
                        "created_at": at,
                        "updated_at": at,
                    },
                )
            else:
                cert_id = cert.id
                if cert.state != "pending":
                    await repo.update_cert(
                        s,
                        d.tenant_id,
                        cert_id,
                        {
                            "state": "pending",
                            "auto_renew": auto_renew,
                            "attempts": 0,
                            "next_attempt_at": None,
                            "updated_at": at,
                        },
                    )
            row = await repo.get_cert(s, d.tenant_id, cert_id)
            assert row is not None
        self.runner.kick((d.tenant_id, cert_id))
        return row

    async def get(self, tenant_id: str, cert_id: str) -> CertRow | None:
        async with self.db.session() as s:
            return await repo.get_cert(s, tenant_id, cert_id)

    # -- the worker -------------------------------------------------------------------------------

    async def due_pass(self) -> None:
        at = now()
        async with self.db.session() as s:
            await repo.drop_expired_challenges(s, at)
            if await repo.clear_expired_tls(s, at):
                self.wake()
            due = await repo.due_certs(s, at, at + self.renew_before)
        for key in due:
            if not self.runner.busy(key):
                self.runner.kick(key)

    async def loop(self) -> None:
        await every("certificate renewal", self.interval.total_seconds(), self.due_pass, first=1.0)

    async def step(self, key: tuple[str, str]) -> bool:
        tenant_id, cert_id = key
        at = now()
        cert = await self.get(tenant_id, cert_id)
        if cert is None or (cert.next_attempt_at is not None and cert.next_attempt_at > at):
            return False
        renewing = cert.state == "issued"
        if renewing and not (
            cert.auto_renew and cert.expires_at is not None and cert.expires_at < at + self.renew_before
        ):
            return False
        if cert.state not in ("pending", "issued"):
            return False
        started = asyncio.get_running_loop().time()
        try:
            issued = await self.issuer.issue(cert.hostname, self.responder)
        except AcmeFailure as failure:
            await self._failed(cert, failure, renewing)
            self.wake()  # the withdrawn challenges leave the ingress
            return False
        took = asyncio.get_running_loop().time() - started
        aad = f"certificate:{cert.id}"
        values = {
            "state": "issued",
            "issuer": issued.issuer,
            "serial": issued.serial,
            "not_before": issued.not_before,
            "expires_at": issued.expires_at,
            "chain_enc": self.keyring.encrypt_str(issued.chain_pem, aad=aad),
            "key_enc": self.keyring.encrypt_str(issued.key_pem, aad=aad),
            "last_error": "",
            "attempts": 0,
            "next_attempt_at": None,
            "updated_at": now(),
        }
        had = bool(cert.serial)
        if had:
            values["renewed_at"] = now()
        async with self.outbox.session() as s:
            if await repo.get_cert(s, tenant_id, cert_id, lock=True) is None:
                return False  # the domain went meanwhile
            await repo.update_cert(s, tenant_id, cert_id, values)
            await repo.update_domain(
                s,
                tenant_id,
                cert.domain_id,
                {"tls_enabled": True, "cert_expiry": issued.expires_at, "updated_at": now()},
            )
            done = await repo.get_cert(s, tenant_id, cert_id)
            assert done is not None
            await events.certificate(
                self.outbox,
                s,
                events.CERT_RENEWED if had else events.CERT_ISSUED,
                done,
                seconds=round(took, 3),
            )
        log.info(
            "certificate %s for %s %s in %.2f s", cert_id, cert.hostname, "renewed" if had else "issued", took
        )
        self.wake()
        await self._audit(done, "renew" if had else "issue", "success", "")
        return False

    async def _failed(self, cert: CertRow, failure: AcmeFailure, renewing: bool) -> None:
        attempts = cert.attempts + 1
        backoff = min(self.retry * (2 ** (attempts - 1)), MAX_BACKOFF)
        give_up = not renewing and (failure.definitive or attempts >= MAX_ATTEMPTS)
        values: dict[str, Any] = {"last_error": failure.message, "attempts": attempts, "updated_at": now()}
        if give_up:
            values.update(state="failed", next_attempt_at=None)
        else:
            values["next_attempt_at"] = now() + backoff
        async with self.outbox.session() as s:
            if await repo.get_cert(s, cert.tenant_id, cert.id, lock=True) is None:
                return
            await repo.update_cert(s, cert.tenant_id, cert.id, values)
            done = await repo.get_cert(s, cert.tenant_id, cert.id)
            assert done is not None
            if give_up or renewing:
                await events.certificate(
                    self.outbox,
                    s,
                    events.CERT_FAILED,
                    done,
                    error=failure.message,
                    renewal=renewing,
                    attempts=attempts,
                )
        log.warning(
            "certificate %s for %s: attempt %d failed: %s", cert.id, cert.hostname, attempts, failure.message
        )
        reason = "AcmeRefused" if failure.definitive else "AcmeUnavailable"
        await self._audit(done, "renew" if renewing else "issue", "failure", reason)

    async def _audit(self, cert: CertRow, action: str, outcome: str, reason: str) -> None:
        await audit.record(
            self.audit,
            tenant_id=cert.tenant_id,
            resource="certificate",
            resource_id=cert.id,
            action=action,
            outcome=outcome,
            reason=reason,
            method="network/certificate-worker",
        )

    async def shutdown(self) -> None:
        await self.runner.shutdown()
