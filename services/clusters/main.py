"""The clusters service process: `python -m services.clusters.main`.

Every Zectre route answers 501 until the PaaS capability lands.
"""

from __future__ import annotations

from pathlib import Path

from ctrlmesh.clusters.v1 import clusters_pb2, clusters_pb2_grpc

from libs.grpc_server import AuditSink, Service
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import register_unimplemented
from services.clusters.models import SCHEMA


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    return (
        Service(
            name="clusters",
            register=lambda server: register_unimplemented(server, clusters_pb2, clusters_pb2_grpc),
        ),
        remote_audit_sink(rt),
    )


if __name__ == "__main__":
    run("clusters", SCHEMA, Path(__file__).parent / "migrations", build)
