"""The ingress's view of domains: verified hostnames, the certificates to serve (decrypted only
here, on their way to Caddy's loopback admin API) and the live HTTP-01 challenges."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from libs.crypto import Keyring
from libs.timeutil import now
from services.network.domains import repository as repo
from services.network.ingress.inputs import Challenge, HostBinding, TlsCertificate

log = logging.getLogger("ctrlmesh.network.domains")


class DomainInputs:
    """IngressInputs over the domains' tables."""

    def __init__(self, keyring: Keyring):
        self.keyring = keyring

    async def verified_hosts(self, session: AsyncSession) -> list[HostBinding]:
        return [HostBinding(h, i, t) for h, i, t in await repo.verified_hosts(session)]

    async def certificates(self, session: AsyncSession) -> list[TlsCertificate]:
        out = []
        for cert_id, hostname, chain_enc, key_enc in await repo.served_certs(session, now()):
            aad = f"certificate:{cert_id}"
            try:
                out.append(
                    TlsCertificate(
                        hostname,
                        self.keyring.decrypt_str(chain_enc, aad=aad),
                        self.keyring.decrypt_str(key_enc, aad=aad),
                    )
                )
            except Exception:
                # One unreadable certificate (a KEK no longer configured) must not take the
                # others off the ingress.
                log.error("certificate %s cannot be decrypted; not served", cert_id)
        return out

    async def challenges(self, session: AsyncSession) -> list[Challenge]:
        return [Challenge(t, k) for t, k in await repo.live_challenges(session, now())]
