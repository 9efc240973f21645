"""SQL for secrets (SQLAlchemy Core over one AsyncSession per unit of work).

Every read of a tenant's secrets takes the tenant and the instance: the caller has checked that
the instance is the caller's first, so another tenant's secret is simply not found. Ciphertexts
never leave this module except as `Version.value_enc` for the domain to decrypt; the system
scan of the re-wrap pass returns only keys and ciphertexts, never tenants' metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from libs.db import xact_lock
from services.network.models import secret_versions, secrets


@dataclass(frozen=True)
class SecretRow:
    """One `secrets` row: a key's metadata and its current version."""

    id: str
    tenant_id: str
    instance_id: str
    key: str
    type: str
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Version:
    """One stored value of a secret (still encrypted)."""

    secret_id: str
    key: str
    type: str
    version: int
    value_enc: str


def _secret(row: Any) -> SecretRow | None:
    if row is None:
        return None
    return SecretRow(
        row.id,
        row.tenant_id,
        row.instance_id,
        row.key,
        row.type,
        row.version,
        row.created_at,
        row.updated_at,
    )


async def lock_tenant(s: AsyncSession, tenant_id: str) -> None:
    """Serialise the quota decision of concurrent creates in one tenant."""
    await xact_lock(s, "network.secrets", tenant_id)


async def count_tenant(s: AsyncSession, tenant_id: str) -> int:
    return int(await s.scalar(select(func.count()).where(secrets.c.tenant_id == tenant_id)) or 0)


async def get(
    s: AsyncSession, tenant_id: str, instance_id: str, key: str, *, lock: bool = False
) -> SecretRow | None:
    q = select(secrets).where(
        secrets.c.tenant_id == tenant_id, secrets.c.instance_id == instance_id, secrets.c.key == key
    )
    if lock:
        q = q.with_for_update()
    return _secret((await s.execute(q)).first())


async def list_for(s: AsyncSession, tenant_id: str, instance_id: str) -> list[SecretRow]:
    q = (
        select(secrets)
        .where(secrets.c.tenant_id == tenant_id, secrets.c.instance_id == instance_id)
        .order_by(secrets.c.key)
    )
    return [r for r in map(_secret, (await s.execute(q)).all()) if r is not None]


async def insert_secret(s: AsyncSession, row: SecretRow) -> None:
    await s.execute(
        insert(secrets).values(
            id=row.id,
            tenant_id=row.tenant_id,
            instance_id=row.instance_id,
            key=row.key,
            type=row.type,
            version=row.version,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
    )


async def set_version(s: AsyncSession, secret_id: str, version: int, at: datetime) -> None:
    await s.execute(update(secrets).where(secrets.c.id == secret_id).values(version=version, updated_at=at))


async def insert_version(
    s: AsyncSession,
    *,
    secret_id: str,
    tenant_id: str,
    version: int,
    value_enc: str,
    kek_id: str,
    at: datetime,
) -> None:
    await s.execute(
        insert(secret_versions).values(
            secret_id=secret_id,
            version=version,
            tenant_id=tenant_id,
            value_enc=value_enc,
            kek_id=kek_id,
            created_at=at,
        )
    )


async def delete_secret(s: AsyncSession, tenant_id: str, secret_id: str) -> None:
    """The secret and every version of it (the values are gone, not hidden)."""
    await s.execute(
        delete(secret_versions).where(
            secret_versions.c.tenant_id == tenant_id, secret_versions.c.secret_id == secret_id
        )
    )
    await s.execute(delete(secrets).where(secrets.c.tenant_id == tenant_id, secrets.c.id == secret_id))


async def versions(
    s: AsyncSession, tenant_id: str, instance_id: str, wanted: dict[str, int] | None, type_: str = ""
) -> list[Version]:
    """The instance's stored values: the current version of every secret (`wanted` None), or
    exactly the (key, version) pairs of `wanted` that still exist."""
    j = secrets.join(secret_versions, secret_versions.c.secret_id == secrets.c.id)
    q = select(
        secrets.c.id, secrets.c.key, secrets.c.type, secret_versions.c.version, secret_versions.c.value_enc
    ).select_from(j)
    q = q.where(secrets.c.tenant_id == tenant_id, secrets.c.instance_id == instance_id)
    if wanted is None:
        q = q.where(secret_versions.c.version == secrets.c.version)
    elif not wanted:
        return []
    else:
        q = q.where(tuple_(secrets.c.key, secret_versions.c.version).in_(list(wanted.items())))
    if type_:
        q = q.where(secrets.c.type == type_)
    rows = (await s.execute(q.order_by(secrets.c.key))).all()
    return [Version(r.id, r.key, r.type, r.version, r.value_enc) for r in rows]


# -- system scans: the re-wrap pass and the orphan sweep -----------------------------------------


async def instances_with_secrets(s: AsyncSession) -> list[tuple[str, str]]:
    """(tenant_id, instance_id) of every instance that holds a secret."""
    q = select(secrets.c.tenant_id, secrets.c.instance_id).distinct()
    return [(r.tenant_id, r.instance_id) for r in (await s.execute(q)).all()]


async def delete_instance(s: AsyncSession, tenant_id: str, instance_id: str) -> list[SecretRow]:
    """Every secret of a deleted instance, with its versions; returns what was deleted."""
    rows = await list_for(s, tenant_id, instance_id)
    for row in rows:
        await delete_secret(s, tenant_id, row.id)
    return rows


@dataclass(frozen=True)
class Wrapped:
    secret_id: str
    version: int
    value_enc: str


async def not_wrapped_by(s: AsyncSession, kek_id: str, limit: int) -> list[Wrapped]:
    q = (
        select(secret_versions.c.secret_id, secret_versions.c.version, secret_versions.c.value_enc)
        .where(secret_versions.c.kek_id != kek_id)
        .limit(limit)
    )
    return [Wrapped(r.secret_id, r.version, r.value_enc) for r in (await s.execute(q)).all()]


async def replace_ciphertext(s: AsyncSession, old: Wrapped, value_enc: str, kek_id: str) -> bool:
    """Store the re-wrapped ciphertext unless the row changed meanwhile."""
    res = await s.execute(
        update(secret_versions)
        .where(
            and_(
                secret_versions.c.secret_id == old.secret_id,
                secret_versions.c.version == old.version,
                secret_versions.c.value_enc == old.value_enc,
            )
        )
        .values(value_enc=value_enc, kek_id=kek_id)
    )
    return bool(getattr(res, "rowcount", 0))
