"""The network service process: `python -m services.network.main`.

Secrets are served by services/network/secrets (with the KEK re-wrap loop); domain, route and
certificate routes answer 501 until their logic lands; the internal contract (quota usage for
domains and secrets, purge) runs on real tables.
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
from services.network import secrets as secrets_pkg
from services.network.models import SCHEMA, domains, outbox, secret_versions, secrets
from services.network.secrets import servicer as secrets_servicer

SPEC = Spec(
    counts=[Count("domains", domains), Count("secrets", secrets)],
    purge=[domains, secret_versions, secrets],
    stats=[Count("domains", domains), Count("secrets", secrets)],
)


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    box = Outbox(outbox, rt.db)
    secret_domain = secrets_pkg.build(rt, keys.keyring(rt.settings), box)
    rewrap_every = rt.settings.secrets_rewrap_interval.total_seconds()

    async def rewrap_loop() -> None:
        await every("secret re-wrap", rewrap_every, secret_domain.rewrap_pass, first=0)

    async def orphan_loop() -> None:
        await every("orphaned secrets sweep", 300, secret_domain.sweep_orphans, first=30)

    def register(server: grpc.aio.Server) -> list[str]:
        return [
            *secrets_servicer.register(server, secret_domain),
            *register_unimplemented(server, network_pb2, network_pb2_grpc, served={"SecretService"}),
            *register_resources(server, rt.db, SPEC),
        ]

    service = Service(
        name="network",
        register=register,
        events=box,
        background=[rewrap_loop, secret_domain.follow_deletions, orphan_loop],
    )
    return service, remote_audit_sink(rt)


if __name__ == "__main__":
    run("network", SCHEMA, Path(__file__).parent / "migrations", build)
