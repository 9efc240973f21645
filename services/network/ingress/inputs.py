"""What the ingress renders besides instances and routes: verified custom domains, their TLS
certificates and pending ACME HTTP-01 challenges. The domains package implements
`IngressInputs`; until it is wired, `NoInputs` keeps the ingress serving default hostnames only.

Each method reads in the caller's session (the reconcile pass's one transaction), so a render
sees one consistent snapshot of the schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True)
class HostBinding:
    """A verified custom domain routed to an instance."""

    hostname: str
    instance_id: str
    tenant_id: str


@dataclass(frozen=True)
class TlsCertificate:
    """Loaded into Caddy (tls.certificates.load_pem); Caddy serves `hostname` on HTTPS with it."""

    hostname: str
    cert_pem: str
    # Already decrypted; it only ever travels to Caddy's admin API on loopback.
    key_pem: str


@dataclass(frozen=True)
class Challenge:
    """ACME HTTP-01: GET http://<any host>:<http port>/.well-known/acme-challenge/<token> answers
    `key_authorization` (text/plain, 200)."""

    token: str
    key_authorization: str


class IngressInputs(Protocol):
    async def verified_hosts(self, session: AsyncSession) -> list[HostBinding]: ...

    async def certificates(self, session: AsyncSession) -> list[TlsCertificate]: ...

    async def challenges(self, session: AsyncSession) -> list[Challenge]: ...


class NoInputs:
    """No custom domains, certificates or challenges."""

    async def verified_hosts(self, session: AsyncSession) -> list[HostBinding]:
        return []

    async def certificates(self, session: AsyncSession) -> list[TlsCertificate]:
        return []

    async def challenges(self, session: AsyncSession) -> list[Challenge]:
        return []
