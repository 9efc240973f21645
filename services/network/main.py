"""The network service process: `python -m services.network.main`.

Domain, route, certificate and secret routes answer 501 until the network capability lands; the
internal contract (quota usage for domains and secrets, purge) already runs on real tables.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from ctrlmesh.network.v1 import network_pb2, network_pb2_grpc

from libs.grpc_server import AuditSink, Service
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import Count, Spec, register_resources, register_unimplemented
from services.network.models import SCHEMA, domains, secrets

SPEC = Spec(
    counts=[Count("domains", domains), Count("secrets", secrets)],
    purge=[domains, secrets],
    stats=[Count("domains", domains), Count("secrets", secrets)],
)


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    def register(server: grpc.aio.Server) -> list[str]:
        return [
            *register_unimplemented(server, network_pb2, network_pb2_grpc),
            *register_resources(server, rt.db, SPEC),
        ]

    return Service(name="network", register=register), remote_audit_sink(rt)


if __name__ == "__main__":
    run("network", SCHEMA, Path(__file__).parent / "migrations", build)
