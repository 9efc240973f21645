"""The network service process: `python -m services.network.main`.

Serves RouteService (routes through the ingress), DomainService (custom domains verified through
DNS, certificates through ACME), SecretService (envelope-encrypted secrets, with the KEK re-wrap
loop), its EventStreamService and the internal TenantResourcesService, and runs the ingress's
loops (applying the rendered config to Caddy, following the instances service's replicas), the
domains' (the certificate worker: issuance, retries, renewal; the re-check of unverified
domains) and the secrets' (re-wrap under the current KEK, deletion with their instance).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from ctrlmesh.network.v1 import network_pb2, network_pb2_grpc

from libs import keys
from libs.grpc_server import AuditSink, Service
from libs.outbox import Outbox
from libs.reconcile import every
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import Count, Spec, register_resources, register_unimplemented
from services.network import domains as domains_pkg
from services.network import secrets as secrets_pkg
from services.network import servicer
from services.network.domains import peers as domain_peers
from services.network.domains import servicer as domains_servicer
from services.network.ingress.caddy import CaddyAdmin
from services.network.ingress.ingress import Ingress
from services.network.ingress.render import Listen
from services.network.models import (
    SCHEMA,
    domains,
    ingress_instances,
    outbox,
    routes,
    secret_versions,
    secrets,
)
from services.network.peers import Accounts, Instances
from services.network.routes import RoutesDomain
from services.network.secrets import servicer as secrets_servicer

SPEC = Spec(
    counts=[Count("domains", domains), Count("secrets", secrets)],
    # Certificates go with their domain (ON DELETE CASCADE).
    purge=[routes, ingress_instances, domains, secret_versions, secrets],
    stats=[Count("domains", domains), Count("secrets", secrets)],
)


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    s = rt.settings
    events = Outbox(outbox, rt.db)
    instances = Instances(rt.channels, rt.signer)
    accounts = Accounts(rt.channels, rt.signer)
    caddy = CaddyAdmin(s.ingress_admin())
    listen = Listen(
        bind=s.ingress_bind,
        http_port=s.ingress_http_port,
        https_port=s.ingress_https_port,
        admin=caddy.listen,
        domain=s.ingress_domain.lower().strip("."),
    )
    ingress = Ingress(
        events,
        caddy,
        instances,
        accounts,
        listen,
        interval=s.ingress_reconcile_interval.total_seconds(),
        resync_interval=s.ingress_resync_interval.total_seconds(),
    )

    audit = remote_audit_sink(rt)
    dom = domains_pkg.build(
        s,
        rt.db,
        events,
        domain_peers.Accounts(rt.channels, rt.signer),
        domain_peers.Instances(rt.channels, rt.signer),
        wake=ingress.wake,
        # Challenges are fetched through the ingress before the CA is asked to look.
        self_check_url=f"http://127.0.0.1:{s.ingress_http_port}",
        audit=audit,
    )
    ingress.use_inputs(dom.inputs)

    secret_domain = secrets_pkg.build(rt, keys.keyring(s), events)
    rewrap_every = s.secrets_rewrap_interval.total_seconds()

    async def rewrap_loop() -> None:
        await every("secret re-wrap", rewrap_every, secret_domain.rewrap_pass, first=0)

    async def orphan_loop() -> None:
        await every("orphaned secrets sweep", 300, secret_domain.sweep_orphans, first=30)

    routes_domain = RoutesDomain(
        events, instances, accounts, ingress.current_inputs, ingress.changed, ingress_domain=listen.domain
    )

    async def stop() -> None:
        await dom.certificates.shutdown()
        await caddy.close()

    def register(server: grpc.aio.Server) -> list[str]:
        return [
            *servicer.register(server, routes_domain),
            domains_servicer.register(server, dom.domains),
            *secrets_servicer.register(server, secret_domain),
            *register_unimplemented(
                server,
                network_pb2,
                network_pb2_grpc,
                served={"RouteService", "DomainService", "SecretService"},
            ),
            *register_resources(server, rt.db, SPEC),
        ]

    service = Service(
        name="network",
        register=register,
        events=events,
        background=[
            *ingress.background(),
            *dom.background,
            rewrap_loop,
            secret_domain.follow_deletions,
            orphan_loop,
        ],
        on_stop=stop,
    )
    return service, audit


if __name__ == "__main__":
    run("network", SCHEMA, Path(__file__).parent / "migrations", build)
