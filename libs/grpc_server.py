"""How every ctrlmesh service boots.

`serve()` is the only way a service starts: typed settings → dependencies built once by the
service's `build()` → `grpc.aio.server` with the fixed chain of `libs/interceptors.py` (tracing →
metrics → context → auth → errors → audit → validation) → the standard
health service and reflection (and the service's EventStreamService when it has an outbox) →
graceful drain on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from libs.events import register_event_stream
from libs.interceptors import STREAM_OPEN_KEY, AuditSink, Chain, open_stream, status_details
from libs.outbox import Outbox

__all__ = ["STREAM_OPEN_KEY", "AuditSink", "Service", "open_stream", "serve", "status_details"]

log = logging.getLogger("ctrlmesh.grpc")


@dataclass
class Service:
    """What a service hands to `serve()`: its name, how to register, and lifecycle hooks."""

    name: str
    register: Callable[[grpc.aio.Server], list[str]]
    on_start: Callable[[], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # The service's outbox, served as its EventStreamService (libs/events.py) when given.
    events: Outbox | None = None


async def serve(
    service: Service,
    *,
    host: str,
    port: int,
    secret: bytes,
    audit_sink: AuditSink | None,
    grace: float = 5.0,
) -> None:
    server = grpc.aio.server(
        interceptors=[Chain(service.name, secret, audit_sink)],
        options=[("grpc.so_reuseport", 0)],
    )
    names = service.register(server)
    if service.events is not None:
        names.append(register_event_stream(server, service.events, service.name))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    server.add_insecure_port(f"{host}:{port}")
    if service.on_start:
        await service.on_start()
    await server.start()
    for n in ["", *names]:
        await health.set(n, health_pb2.HealthCheckResponse.SERVING)
    tasks = [asyncio.create_task(fn(), name=f"{service.name}-bg") for fn in service.background]
    log.info("%s serving gRPC on %s:%d", service.name, host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s draining", service.name)
    for n in ["", *names]:
        await health.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
    for t in tasks:
        t.cancel()
    await server.stop(grace)
    if service.on_stop:
        await service.on_stop()
    log.info("%s stopped", service.name)
