"""The events of domains and certificates, written to the network outbox in the transaction of
the change: `domain.added|verified|verification_failed|removed` and
`certificate.issued|renewed|failed`. Payloads name the resource and never carry key material."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from libs.outbox import Outbox
from services.network.domains.repository import CertRow, DomainRow

DOMAIN_ADDED = "domain.added"
DOMAIN_VERIFIED = "domain.verified"
DOMAIN_VERIFICATION_FAILED = "domain.verification_failed"
DOMAIN_REMOVED = "domain.removed"
CERT_ISSUED = "certificate.issued"
CERT_RENEWED = "certificate.renewed"
CERT_FAILED = "certificate.failed"


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


async def domain(outbox: Outbox, s: AsyncSession, type_: str, d: DomainRow, **extra: Any) -> None:
    await outbox.publish(
        s,
        type_,
        resource="domain",
        resource_id=d.id,
        tenant_id=d.tenant_id,
        account_id=d.account_id,
        data={"domain_id": d.id, "hostname": d.hostname, "instance_id": d.instance_id, **extra},
    )


async def certificate(outbox: Outbox, s: AsyncSession, type_: str, c: CertRow, **extra: Any) -> None:
    await outbox.publish(
        s,
        type_,
        resource="certificate",
        resource_id=c.id,
        tenant_id=c.tenant_id,
        account_id=c.account_id,
        data={
            "certificate_id": c.id,
            "domain_id": c.domain_id,
            "hostname": c.hostname,
            "issuer": c.issuer,
            "serial": c.serial,
            "not_before": _ts(c.not_before),
            "expires_at": _ts(c.expires_at),
            **extra,
        },
    )
