"""SQL for domains, certificates and ACME state (SQLAlchemy Core over one AsyncSession).

Every read of a tenant's data takes the tenant; another tenant's row is simply not found. The
background scans (re-check, issuance, renewal) return only keys; `domain_by_id` is the one lookup by
bare id, and its caller checks the tenant's visibility before showing any of it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession

from libs.db import xact_lock
from services.network.domains.models import acme_accounts, acme_challenges, certificates
from services.network.models import domains


@dataclass(frozen=True)
class DomainRow:
    id: str
    tenant_id: str
    account_id: str
    instance_id: str
    hostname: str
    verified: bool
    verify_token: str
    tls_enabled: bool
    auto_tls: bool
    cert_expiry: datetime | None
    verified_at: datetime | None
    next_check_at: datetime | None
    check_attempts: int
    last_check_error: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class CertRow:
    id: str
    domain_id: str
    tenant_id: str
    account_id: str
    hostname: str
    state: str
    issuer: str
    serial: str
    not_before: datetime | None
    expires_at: datetime | None
    auto_renew: bool
    last_error: str
    attempts: int
    next_attempt_at: datetime | None
    renewed_at: datetime | None
    created_at: datetime
    updated_at: datetime


_DOMAIN = tuple(f.name for f in fields(DomainRow))
_CERT = tuple(f.name for f in fields(CertRow))


def _domain(row: Any) -> DomainRow | None:
    return None if row is None else DomainRow(**{k: row[k] for k in _DOMAIN})


def _cert(row: Any) -> CertRow | None:
    return None if row is None else CertRow(**{k: row[k] for k in _CERT})


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


# -- domains ---------------------------------------------------------------------------------------


async def lock_tenant(s: AsyncSession, tenant_id: str) -> None:
    """Serialise the `max_domains` decisions of one tenant until the transaction ends."""
    await xact_lock(s, "network.domains", tenant_id)


async def count_domains(s: AsyncSession, tenant_id: str) -> int:
    return int(
        await s.scalar(select(func.count()).select_from(domains).where(domains.c.tenant_id == tenant_id)) or 0
    )


async def hostname_taken(s: AsyncSession, hostname: str) -> bool:
    return (await s.scalar(select(domains.c.id).where(domains.c.hostname == hostname))) is not None


async def insert_domain(s: AsyncSession, values: dict[str, Any]) -> None:
    await s.execute(insert(domains).values(**values))


async def get_domain(
    s: AsyncSession, tenant_id: str, domain_id: str, *, lock: bool = False
) -> DomainRow | None:
    q = select(domains).where(domains.c.tenant_id == tenant_id, domains.c.id == domain_id)
    if lock:
        q = q.with_for_update()
    return _domain((await s.execute(q)).mappings().first())


async def list_domains(s: AsyncSession, tenant_id: str, instance_id: str) -> list[DomainRow]:
    q = (
        select(domains)
        .where(domains.c.tenant_id == tenant_id, domains.c.instance_id == instance_id)
        .order_by(domains.c.id)
    )
    return [d for d in map(_domain, (await s.execute(q)).mappings().all()) if d is not None]


async def domain_by_id(s: AsyncSession, domain_id: str) -> DomainRow | None:
    """A domain by bare id, whatever its tenant: the caller resolves that tenant's visibility
    before anything of the row is shown (libs.peers.by_id)."""
    return _domain((await s.execute(select(domains).where(domains.c.id == domain_id))).mappings().first())


async def update_domain(s: AsyncSession, tenant_id: str, domain_id: str, values: dict[str, Any]) -> None:
    await s.execute(
        update(domains).where(domains.c.tenant_id == tenant_id, domains.c.id == domain_id).values(**values)
    )


async def delete_domain(s: AsyncSession, tenant_id: str, domain_id: str) -> bool:
    await s.execute(
        delete(certificates).where(
            certificates.c.tenant_id == tenant_id, certificates.c.domain_id == domain_id
        )
    )
    res = await s.execute(delete(domains).where(domains.c.tenant_id == tenant_id, domains.c.id == domain_id))
    return _rowcount(res) > 0


async def due_rechecks(s: AsyncSession, at: datetime, limit: int = 50) -> list[tuple[str, str]]:
    """(tenant_id, domain_id) of unverified domains whose background re-check is due."""
    q = (
        select(domains.c.tenant_id, domains.c.id)
        .where(~domains.c.verified, domains.c.next_check_at <= at)
        .order_by(domains.c.next_check_at)
        .limit(limit)
    )
    return [(r[0], r[1]) for r in (await s.execute(q)).all()]


# -- certificates ----------------------------------------------------------------------------------


async def get_cert_of_domain(
    s: AsyncSession, tenant_id: str, domain_id: str, *, lock: bool = False
) -> CertRow | None:
    q = select(certificates).where(
        certificates.c.tenant_id == tenant_id, certificates.c.domain_id == domain_id
    )
    if lock:
        q = q.with_for_update()
    return _cert((await s.execute(q)).mappings().first())


async def get_cert(s: AsyncSession, tenant_id: str, cert_id: str, *, lock: bool = False) -> CertRow | None:
    q = select(certificates).where(certificates.c.tenant_id == tenant_id, certificates.c.id == cert_id)
    if lock:
        q = q.with_for_update(skip_locked=True)
    return _cert((await s.execute(q)).mappings().first())


async def certs_of_domains(s: AsyncSession, tenant_id: str, domain_ids: list[str]) -> dict[str, CertRow]:
    if not domain_ids:
        return {}
    q = select(certificates).where(
        certificates.c.tenant_id == tenant_id, certificates.c.domain_id.in_(domain_ids)
    )
    rows = [c for c in map(_cert, (await s.execute(q)).mappings().all()) if c is not None]
    return {c.domain_id: c for c in rows}


async def insert_cert(s: AsyncSession, values: dict[str, Any]) -> None:
    await s.execute(insert(certificates).values(**values))


async def update_cert(s: AsyncSession, tenant_id: str, cert_id: str, values: dict[str, Any]) -> None:
    await s.execute(
        update(certificates)
        .where(certificates.c.tenant_id == tenant_id, certificates.c.id == cert_id)
        .values(**values)
    )


async def due_certs(
    s: AsyncSession, at: datetime, renew_if_expiring_before: datetime, limit: int = 20
) -> list[tuple[str, str]]:
    """(tenant_id, cert_id) of certificates with work due: a pending one whose attempt is due,
    or an issued auto-renewing one inside the renewal window (respecting a failed renewal's
    backoff)."""
    c = certificates
    due_now = or_(c.c.next_attempt_at.is_(None), c.c.next_attempt_at <= at)
    q = (
        select(c.c.tenant_id, c.c.id)
        .where(
            due_now,
            or_(
                c.c.state == "pending",
                and_(c.c.state == "issued", c.c.auto_renew, c.c.expires_at < renew_if_expiring_before),
            ),
        )
        .order_by(c.c.next_attempt_at.nulls_first())
        .limit(limit)
    )
    return [(r[0], r[1]) for r in (await s.execute(q)).all()]


async def clear_expired_tls(s: AsyncSession, at: datetime) -> int:
    """Domains whose certificate expired unrenewed are no longer served over TLS."""
    res = await s.execute(
        update(domains)
        .where(domains.c.tls_enabled, domains.c.cert_expiry <= at)
        .values(tls_enabled=False, updated_at=at)
    )
    return _rowcount(res)


async def cert_material(s: AsyncSession, tenant_id: str, cert_id: str) -> tuple[str, str] | None:
    q = select(certificates.c.chain_enc, certificates.c.key_enc).where(
        certificates.c.tenant_id == tenant_id, certificates.c.id == cert_id
    )
    row = (await s.execute(q)).first()
    if row is None or row[0] is None or row[1] is None:
        return None
    return str(row[0]), str(row[1])


# -- what the ingress serves -----------------------------------------------------------------------


async def verified_hosts(s: AsyncSession) -> list[tuple[str, str, str]]:
    """(hostname, instance_id, tenant_id) of every verified domain (a system read)."""
    q = (
        select(domains.c.hostname, domains.c.instance_id, domains.c.tenant_id)
        .where(domains.c.verified)
        .order_by(domains.c.hostname)
    )
    return [(r[0], r[1], r[2]) for r in (await s.execute(q)).all()]


async def served_certs(s: AsyncSession, at: datetime) -> list[tuple[str, str, str, str]]:
    """(cert id, hostname, chain_enc, key_enc) of every issued, unexpired certificate of a
    verified domain (a system read)."""
    c = certificates
    q = (
        select(c.c.id, c.c.hostname, c.c.chain_enc, c.c.key_enc)
        .join(domains, domains.c.id == c.c.domain_id)
        .where(domains.c.verified, c.c.chain_enc.is_not(None), c.c.key_enc.is_not(None), c.c.expires_at > at)
        .order_by(c.c.hostname)
    )
    return [(r[0], r[1], r[2], r[3]) for r in (await s.execute(q)).all()]


async def put_challenge(
    s: AsyncSession, token: str, key_authorization: str, hostname: str, expires_at: datetime
) -> None:
    stmt = pg_insert(acme_challenges).values(
        token=token, key_authorization=key_authorization, hostname=hostname, expires_at=expires_at
    )
    await s.execute(
        stmt.on_conflict_do_update(
            index_elements=[acme_challenges.c.token],
            set_={"key_authorization": key_authorization, "expires_at": expires_at},
        )
    )


async def drop_challenges(s: AsyncSession, tokens: list[str]) -> None:
    await s.execute(delete(acme_challenges).where(acme_challenges.c.token.in_(tokens)))


async def live_challenges(s: AsyncSession, at: datetime) -> list[tuple[str, str]]:
    q = select(acme_challenges.c.token, acme_challenges.c.key_authorization).where(
        acme_challenges.c.expires_at > at
    )
    return [(r[0], r[1]) for r in (await s.execute(q)).all()]


async def drop_expired_challenges(s: AsyncSession, at: datetime) -> None:
    await s.execute(delete(acme_challenges).where(acme_challenges.c.expires_at <= at))


# -- the ACME account ------------------------------------------------------------------------------


async def get_account(s: AsyncSession, directory: str) -> tuple[str, str] | None:
    row = (
        await s.execute(
            select(acme_accounts.c.key_enc, acme_accounts.c.uri).where(acme_accounts.c.directory == directory)
        )
    ).first()
    return None if row is None else (str(row[0]), str(row[1]))


async def put_account(s: AsyncSession, directory: str, key_enc: str, uri: str, at: datetime) -> None:
    stmt = pg_insert(acme_accounts).values(directory=directory, key_enc=key_enc, uri=uri, created_at=at)
    await s.execute(
        stmt.on_conflict_do_update(
            index_elements=[acme_accounts.c.directory], set_={"key_enc": key_enc, "uri": uri}
        )
    )
