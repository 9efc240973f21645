"""The network service process: `python -m services.network.main`.

Serves RouteService (routes through the ingress), DomainService (custom domains verified through
DNS, certificates through ACME), its EventStreamService and the internal TenantResourcesService,
and runs the ingress's loops (applying the rendered config to Caddy, following the instances
service's replicas) and the domains' (the certificate worker: issuance, retries, renewal; the
re-check of unverified domains). Secret routes answer 501 until their package is wired here.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from ctrlmesh.network.v1 import network_pb2, network_pb2_grpc

from libs.grpc_server import AuditSink, Service
from libs.outbox import Outbox
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import Count, Spec, register_resources, register_unimplemented
from services.network import domains as domains_pkg
from services.network import servicer
from services.network.domains import peers as domain_peers
from services.network.domains import servicer as domains_servicer
from services.network.ingress.caddy import CaddyAdmin
from services.network.ingress.ingress import Ingress
from services.network.ingress.render import Listen
from services.network.models import SCHEMA, domains, ingress_instances, outbox, routes, secrets
from services.network.peers import Accounts, Instances
from services.network.routes import RoutesDomain

SPEC = Spec(
    counts=[Count("domains", domains), Count("secrets", secrets)],
    # Certificates go with their domain (ON DELETE CASCADE).
    purge=[routes, ingress_instances, domains, secrets],
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
            *register_unimplemented(
                server, network_pb2, network_pb2_grpc, besides=["RouteService", "DomainService"]
            ),
            *register_resources(server, rt.db, SPEC),
        ]

    service = Service(
        name="network",
        register=register,
        events=events,
        background=[*ingress.background(), *dom.background],
        on_stop=stop,
    )
    return service, audit


if __name__ == "__main__":
    run("network", SCHEMA, Path(__file__).parent / "migrations", build)
