"""The instances service process: `python -m services.instances.main`.

The public instance, deployment, health and telemetry routes answer 501 until the app-instances
capability lands; the internal contract (quota usage, purge, stats) already runs on real tables.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func

from ctrlmesh.instances.v1 import instances_pb2, instances_pb2_grpc
from libs.grpc_server import AuditSink, Service
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import Count, Spec, register_resources, register_unimplemented
from services.instances.models import SCHEMA, instances


def _live(t):  # type: ignore[no-untyped-def]
    return t.c.state.notin_(("destroyed",))


def _sum(col: str):  # type: ignore[no-untyped-def]
    return lambda t: func.coalesce(func.sum(t.c[col] * t.c.replicas), 0)


SPEC = Spec(
    counts=[
        Count("instances", instances, where=_live),
        Count("cpu_millis", instances, aggregate=_sum("cpu_millis"), where=_live),
        Count("memory_mb", instances, aggregate=_sum("memory_mb"), where=_live),
        Count("disk_mb", instances, aggregate=_sum("disk_mb"), where=_live),
    ],
    purge=[instances],
    stats=[
        Count("instances", instances, where=_live),
        Count("running_instances", instances, where=lambda t: t.c.state == "running"),
    ],
)


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    def register(server):  # type: ignore[no-untyped-def]
        return [
            *register_unimplemented(server, instances_pb2, instances_pb2_grpc),
            *register_resources(server, rt.db, SPEC),
        ]

    return Service(name="instances", register=register), remote_audit_sink(rt)


if __name__ == "__main__":
    run("instances", SCHEMA, Path(__file__).parent / "migrations", build)
