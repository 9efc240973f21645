"""The databases service process: `python -m services.databases.main`.

The public database routes answer 501 until the serverless PostgreSQL capability lands; the
internal contract (resource counts, purge, stats) already runs on the real tables.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func

from ctrlmesh.databases.v1 import databases_pb2, databases_pb2_grpc
from libs.grpc_server import AuditSink, Service
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import Count, Spec, register_resources, register_unimplemented
from services.databases.models import SCHEMA, databases

SPEC = Spec(
    counts=[Count("databases", databases, where=lambda t: t.c.state != "deleting")],
    purge=[databases],
    stats=[
        Count("databases", databases),
        Count("running_databases", databases, where=lambda t: t.c.state == "ready"),
        Count("active_connections", databases, aggregate=lambda t: func.coalesce(func.sum(t.c.active_connections), 0)),
    ],
)


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    def register(server):  # type: ignore[no-untyped-def]
        return [
            *register_unimplemented(server, databases_pb2, databases_pb2_grpc),
            *register_resources(server, rt.db, SPEC),
        ]

    return Service(name="databases", register=register), remote_audit_sink(rt)


if __name__ == "__main__":
    run("databases", SCHEMA, Path(__file__).parent / "migrations", build)
