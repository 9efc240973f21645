"""Custom domains of instances: hostnames verified through a DNS TXT record, certificates
issued and renewed through ACME, served by the ingress (services/network/ingress).

`build()` makes the package's pieces once per process from the settings; the network service's
main registers the servicer and runs the loops.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from libs import keys
from libs.db import Database
from libs.outbox import Outbox
from libs.reconcile import every
from libs.settings import Settings
from services.network.domains.acme import AcmeIssuer
from services.network.domains.certificates import Certificates, DbAccounts, IngressResponder
from services.network.domains.dns import TxtResolver
from services.network.domains.domain import Domains
from services.network.domains.inputs import DomainInputs
from services.network.domains.peers import Accounts, Instances


@dataclass
class Built:
    domains: Domains
    certificates: Certificates
    inputs: DomainInputs
    background: list[Callable[[], Coroutine[Any, Any, None]]]


def build(
    settings: Settings,
    db: Database,
    outbox: Outbox,
    accounts: Accounts,
    instances: Instances,
    *,
    wake: Callable[[], None],
    self_check_url: str,
    audit: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> Built:
    keyring = keys.keyring(settings)
    issuer = AcmeIssuer(
        settings.acme_directory,
        email=settings.acme_email,
        ca_bundle=settings.acme_ca_bundle,
        accounts=DbAccounts(db, keyring),
        timeout=settings.acme_timeout,
    )
    certs = Certificates(
        db,
        outbox,
        keyring,
        issuer,
        IngressResponder(db, wake, self_check_url),
        renew_before=settings.cert_renew_before,
        interval=settings.cert_renew_interval,
        retry=settings.acme_retry,
        wake=wake,
        audit=audit,
    )
    domains = Domains(
        db,
        outbox,
        accounts,
        instances,
        TxtResolver(settings.dns_resolver),
        certs,
        platform_domain=settings.ingress_domain,
        dns_target=settings.dns_target,
        recheck=settings.domain_recheck,
        recheck_max=settings.domain_recheck_max,
        wake=wake,
        audit_sink=audit,
    )
    # The re-check looks at due rows often; each domain's own backoff decides when it is due.
    recheck_every = min(settings.domain_recheck.total_seconds(), 5.0)

    async def recheck_loop() -> None:
        await every("domain re-check", recheck_every, domains.recheck_pass, first=recheck_every)

    return Built(domains, certs, DomainInputs(keyring), [certs.loop, recheck_loop])
