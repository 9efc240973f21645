"""The network service process: `python -m services.network.main`.

Serves DomainService (custom domains verified through DNS, certificates through ACME) and runs
its loops (the certificate worker: issuance, retries, renewal; the re-check of unverified
domains). Route and secret routes answer 501 until their logic lands; the internal contract
(quota usage for domains and secrets, purge) runs on real tables.
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
from services.network.domains import servicer as domains_servicer
from services.network.domains.peers import Accounts, Instances
from services.network.models import SCHEMA, domains, outbox, secrets

SPEC = Spec(
    counts=[Count("domains", domains), Count("secrets", secrets)],
    # Certificates go with their domain (ON DELETE CASCADE).
    purge=[domains, secrets],
    stats=[Count("domains", domains), Count("secrets", secrets)],
)


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    events = Outbox(outbox, rt.db)
    audit = remote_audit_sink(rt)
    s = rt.settings

    def wake() -> None:
        """The ingress re-renders from the tables (wired when the ingress lands)."""

    dom = domains_pkg.build(
        s,
        rt.db,
        events,
        Accounts(rt.channels, rt.signer),
        Instances(rt.channels, rt.signer),
        wake=wake,
        self_check_url=f"http://127.0.0.1:{s.ingress_http_port}",
        audit=audit,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        return [
            domains_servicer.register(server, dom.domains),
            *register_unimplemented(server, network_pb2, network_pb2_grpc, skip=frozenset({"DomainService"})),
            *register_resources(server, rt.db, SPEC),
        ]

    service = Service(
        name="network",
        register=register,
        events=events,
        background=dom.background,
        on_stop=dom.certificates.shutdown,
    )
    return service, audit


if __name__ == "__main__":
    run("network", SCHEMA, Path(__file__).parent / "migrations", build)
