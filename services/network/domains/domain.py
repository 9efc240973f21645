"""Domains: the /v1 domain routes and the background re-check of unverified domains. Plain
Python over the repository; no gRPC here.

A domain is reached through its tenant: the instance (create, list) or the domain's owner (by
id) is resolved with the caller's own principal first, so another tenant's domain is NOT_FOUND
exactly like a missing one. `max_domains` is decided under a per-tenant advisory lock and the
hostname's uniqueness is a constraint, so concurrent creates cannot pass either.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs import ids
from libs.db import Database
from libs.errors import (
    AlreadyExists,
    InvalidState,
    PermissionDenied,
    QuotaExceeded,
    VerificationFailed,
    not_found,
)
from libs.outbox import Outbox
from libs.peers import by_id
from libs.principal import Principal
from libs.timeutil import now
from services.network.domains import audit, events, hostnames
from services.network.domains import repository as repo
from services.network.domains.certificates import Certificates
from services.network.domains.dns import TxtLookup, TxtResolver
from services.network.domains.peers import Accounts, Instances, TenantLimits
from services.network.domains.repository import CertRow, DomainRow

log = logging.getLogger("ctrlmesh.network.domains")


@dataclass(frozen=True)
class DomainView:
    """A domain as the API shows it: with its certificate, once one was requested."""

    domain: DomainRow
    cert: CertRow | None


async def _view(s: AsyncSession, d: DomainRow) -> DomainView:
    return DomainView(d, (await repo.certs_of_domains(s, d.tenant_id, [d.id])).get(d.id))


def _writable(t: TenantLimits) -> None:
    if t.status == "suspended":
        raise PermissionDenied("tenant suspended", details={"tenant_id": t.tenant_id})


class Domains:
    def __init__(
        self,
        db: Database,
        outbox: Outbox,
        accounts: Accounts,
        instances: Instances,
        resolver: TxtResolver,
        certs: Certificates,
        *,
        platform_domain: str,
        dns_target: str,
        recheck: timedelta,
        recheck_max: timedelta,
        wake: Callable[[], None],
        audit_sink: audit.AuditSink | None = None,
    ):
        self.audit_sink = audit_sink
        self.db = db
        self.outbox = outbox
        self.accounts = accounts
        self.instances = instances
        self.resolver = resolver
        self.certs = certs
        self.platform_domain = platform_domain
        self.dns_target = dns_target or platform_domain
        self.recheck = recheck
        self.recheck_max = recheck_max
        self.wake = wake

    # -- routes ----------------------------------------------------------------------------------

    async def create(self, p: Principal, instance_id: str, hostname: str, *, auto_tls: bool) -> DomainView:
        host = hostnames.normalize(hostname, self.platform_domain)
        inst = await self.instances.get(p, instance_id)
        t = await self.accounts.limits(p, inst.tenant_id)
        _writable(t)
        at = now()
        domain_id = ids.new_id("dom")
        taken = AlreadyExists(f"the hostname {host!r} is already registered", details={"field": "hostname"})
        try:
            async with self.outbox.session() as s:
                await repo.lock_tenant(s, t.tenant_id)
                if t.max_domains:
                    used = await repo.count_domains(s, t.tenant_id)
                    if used >= t.max_domains:
                        raise QuotaExceeded(
                            f"quota max_domains of {t.max_domains} would be exceeded: {used} in use",
                            details={
                                "quota": "max_domains",
                                "limit": t.max_domains,
                                "used": used,
                                "requested": 1,
                            },
                        )
                if await repo.hostname_taken(s, host):
                    raise taken
                await repo.insert_domain(
                    s,
                    {
                        "id": domain_id,
                        "tenant_id": t.tenant_id,
                        "account_id": t.account_id,
                        "instance_id": inst.id,
                        "hostname": host,
                        "verified": False,
                        "verify_token": f"ctrlmesh-verify={secrets.token_urlsafe(24)}",
                        "auto_tls": auto_tls,
                        "next_check_at": at + self.recheck,
                        "created_at": at,
                        "updated_at": at,
                    },
                )
                row = await repo.get_domain(s, t.tenant_id, domain_id)
                assert row is not None
                await events.domain(self.outbox, s, events.DOMAIN_ADDED, row)
        except IntegrityError:
            # Two creates of one hostname at once: the constraint decided.
            raise taken from None
        return DomainView(row, None)

    async def list(self, p: Principal, instance_id: str) -> list[DomainView]:
        inst = await self.instances.get(p, instance_id)
        async with self.db.session() as s:
            rows = await repo.list_domains(s, inst.tenant_id, inst.id)
            certs = await repo.certs_of_domains(s, inst.tenant_id, [d.id for d in rows])
        return [DomainView(d, certs.get(d.id)) for d in rows]

    async def resolve(self, p: Principal, domain_id: str) -> tuple[TenantLimits, DomainRow]:
        """The domain and its tenant as `p` sees them; NotFound for a missing or invisible one."""
        row, t = await by_id(
            lambda: self.db.read(lambda s: repo.domain_by_id(s, domain_id)),
            lambda d: d.tenant_id,
            lambda tenant_id: self.accounts.limits(p, tenant_id),
            kind="domain",
            ident=domain_id,
        )
        return t, row

    async def verify(self, p: Principal, domain_id: str) -> DomainView:
        t, row = await self.resolve(p, domain_id)
        _writable(t)
        if not row.verified:
            name = hostnames.txt_record(row.hostname)
            lookup = await self.resolver.txt(name)
            if not lookup.holds(row.verify_token):
                await self._verification_failed(row, lookup)
            row = await self._mark_verified(row)
        async with self.db.session() as s:
            return await _view(s, row)

    async def _verification_failed(self, row: DomainRow, lookup: TxtLookup) -> NoReturn:
        async with self.outbox.session() as s:
            await repo.update_domain(
                s,
                row.tenant_id,
                row.id,
                {
                    "last_check_error": lookup.describe(),
                    # The tenant is at work on it: the background re-check starts over quickly.
                    "check_attempts": 0,
                    "next_check_at": now() + self.recheck,
                    "updated_at": now(),
                },
            )
            await events.domain(
                self.outbox, s, events.DOMAIN_VERIFICATION_FAILED, row, found=lookup.describe()
            )
        raise VerificationFailed(
            f"the TXT record {lookup.name} does not hold this domain's verify_token: {lookup.describe()}",
            details=_found(lookup, row.verify_token),
        )

    async def delete(self, p: Principal, domain_id: str) -> None:
        t, row = await self.resolve(p, domain_id)
        _writable(t)
        async with self.outbox.session() as s:
            if not await repo.delete_domain(s, row.tenant_id, row.id):
                raise not_found("domain", domain_id)
            await events.domain(self.outbox, s, events.DOMAIN_REMOVED, row)
        self.wake()

    async def provision(self, p: Principal, domain_id: str, *, auto_renew: bool) -> CertRow:
        t, row = await self.resolve(p, domain_id)
        _writable(t)
        if not row.verified:
            raise InvalidState(
                f"domain {row.hostname!r} is not verified; create its TXT record and verify it first",
                details={"state": "unverified", "txt_record": hostnames.txt_record(row.hostname)},
            )
        return await self.certs.request(row, auto_renew=auto_renew)

    # -- verification, on request and in the background -----------------------------------------

    async def _mark_verified(self, row: DomainRow) -> DomainRow:
        at = now()
        async with self.outbox.session() as s:
            current = await repo.get_domain(s, row.tenant_id, row.id, lock=True)
            if current is None:
                raise not_found("domain", row.id)
            if current.verified:
                return current
            await repo.update_domain(
                s,
                row.tenant_id,
                row.id,
                {
                    "verified": True,
                    "verified_at": at,
                    "next_check_at": None,
                    "last_check_error": "",
                    "updated_at": at,
                },
            )
            done = await repo.get_domain(s, row.tenant_id, row.id)
            assert done is not None
            await events.domain(self.outbox, s, events.DOMAIN_VERIFIED, done)
        # The ingress now routes the hostname (and answers its ACME challenges).
        self.wake()
        if done.auto_tls:
            await self.certs.request(done, auto_renew=True)
        return done

    async def recheck_pass(self) -> None:
        """Look up every unverified domain whose re-check is due; back off on each miss."""
        async with self.db.session() as s:
            due = await repo.due_rechecks(s, now())
        for tenant_id, domain_id in due:
            async with self.db.session() as s:
                row = await repo.get_domain(s, tenant_id, domain_id)
            if row is None or row.verified:
                continue
            lookup = await self.resolver.txt(hostnames.txt_record(row.hostname))
            if lookup.holds(row.verify_token):
                log.info("domain %s verified by the background re-check", row.id)
                await self._mark_verified(row)
                await audit.record(
                    self.audit_sink,
                    tenant_id=row.tenant_id,
                    resource="domain",
                    resource_id=row.id,
                    action="verify",
                    outcome="success",
                    method="network/domain-recheck",
                )
                continue
            attempts = row.check_attempts + 1
            delay = min(self.recheck * (2**attempts), self.recheck_max)
            async with self.db.session() as s:
                await repo.update_domain(
                    s,
                    tenant_id,
                    domain_id,
                    {
                        "check_attempts": attempts,
                        "next_check_at": now() + delay,
                        "last_check_error": lookup.describe(),
                    },
                )


def _found(lookup: TxtLookup, token: str) -> dict[str, str]:
    out = {"txt_record": lookup.name, "expected": token, "found": "; ".join(lookup.values)}
    if lookup.problem:
        out["problem"] = lookup.problem
    return out
