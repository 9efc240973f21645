"""The common `main` of every service process: settings → telemetry → database and migrations →
the service's own `build()` → `serve()`. A service module supplies only `build()`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc

from libs import budget, keys
from libs.clients import Channels, Signer
from libs.db import Database, make_engine, migrate
from libs.grpc_server import AuditSink, Service, serve
from libs.settings import Settings
from libs.telemetry import instrument_engine, serve_metrics, setup_logging, setup_tracing

log = logging.getLogger("ctrlmesh.service")


@dataclass
class Runtime:
    """What a service's build() receives: everything built once per process."""

    name: str
    settings: Settings
    db: Database
    channels: Channels
    signer: Signer
    secret: bytes


def remote_audit_sink(rt: Runtime) -> AuditSink:
    stub = accounts_pb2_grpc.AuditServiceStub(rt.channels.get("accounts"))

    async def sink(entry: dict[str, Any]) -> None:
        await stub.RecordAudit(accounts_pb2.AuditEntry(**entry), metadata=rt.signer.system(), timeout=5)

    return sink


Build = Callable[[Runtime], Awaitable[tuple[Service, AuditSink | None]]]


async def _main(name: str, schema: str, migrations: Path, build: Build) -> None:
    settings = Settings.load()
    setup_logging(settings.log_level)
    setup_tracing(f"ctrlmesh-{name}", settings.trace_sample_ratio)
    if not settings.database_url:
        raise SystemExit("CTRLMESH_DATABASE_URL is not set (make run / the launcher sets it)")
    engine = make_engine(settings.database_url)
    instrument_engine(engine)
    budget.instrument_engine(engine)
    await migrate(engine, schema, migrations)
    secret = keys.internal_secret(settings)
    rt = Runtime(name, settings, Database(engine), Channels(settings), Signer(secret, name), secret)
    port = settings.service_port(name)
    serve_metrics(settings.grpc_host, port + settings.metrics_port_offset)
    service, sink = await build(rt)
    try:
        await serve(service, host=settings.grpc_host, port=port, secret=secret, audit_sink=sink)
    finally:
        await rt.channels.close()
        await rt.db.dispose()


def run(name: str, schema: str, migrations: Path, build: Build) -> None:
    try:
        with asyncio.Runner(loop_factory=loop_factory(Settings.load())) as runner:
            runner.run(_main(name, schema, migrations, build))
    except KeyboardInterrupt:
        pass


def loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """`CTRLMESH_EVENT_LOOP`: uvloop's loop, or None for asyncio's own."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None
