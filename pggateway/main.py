"""`python -m pggateway.main`: the PG Gateway — a supervisor and its worker processes.

Run without arguments it is the supervisor (`pggateway.workers`): it makes the TLS material once
(so workers do not race to generate it) and starts CTRLMESH_PG_WORKERS workers, each this module
again with its slot arguments. A worker: settings → logging and tracing → TLS material → the gRPC
control plane (accounts for credentials, databases for leases, with a signed system principal)
→ Prometheus on CTRLMESH_PG_METRICS_PORT + its index → the listener (SO_REUSEPORT when there are
several), on uvloop. SIGTERM/SIGINT stop it gracefully: clients are told (57P01), leases are
released.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import uuid

import uvloop
from prometheus_client import start_http_server

from libs import keys, pg_socket
from libs.clients import Channels, Signer
from libs.settings import Settings
from libs.telemetry import setup_logging, setup_tracing
from pggateway.controlplane import GrpcControlPlane
from pggateway.metrics import GatewayMetrics
from pggateway.server import GatewayConfig, GatewayServer
from pggateway.tls import TlsMaterial, ensure_material
from pggateway.workers import (
    Supervisor,
    WorkerSlot,
    add_worker_arguments,
    die_with_parent,
    module_command,
    slot_from_args,
    worker_count,
    worker_pool_size,
)

log = logging.getLogger("ctrlmesh.pggateway")

SERVICE_NAME = "pggateway"


def metrics_port(settings: Settings, slot: WorkerSlot | None = None) -> int:
    base = settings.pg_metrics_port if settings.pg_metrics_port is not None else settings.pg_port + 1000
    return base + (slot.index if slot is not None else 0)


def config_from(
    settings: Settings, slot: WorkerSlot | None = None, unix_fd: int | None = None
) -> GatewayConfig:
    slot = slot or WorkerSlot()
    return GatewayConfig(
        host=settings.pg_host,
        port=settings.pg_port,
        # This process: one lease per (holder, database), so a restarted worker is a new holder.
        holder_id=f"pggateway:{socket.gethostname()}:{os.getpid()}:w{slot.index}:{uuid.uuid4().hex[:8]}",
        pool_size=worker_pool_size(settings.pg_pool_size, slot.count),
        wake_timeout=settings.pg_wake_timeout.total_seconds(),
        checkout_timeout=settings.pg_checkout_timeout.total_seconds(),
        lease_ttl=settings.pg_lease_ttl.total_seconds(),
        credentials_ttl=settings.pg_credentials_cache_ttl.total_seconds(),
        max_prepared_statements=settings.pg_max_prepared_statements,
        worker_index=slot.index,
        peers=slot.peers(),
        unix_fd=unix_fd,
    )


def _material(settings: Settings) -> TlsMaterial:
    return ensure_material(
        settings.data_dir, settings.public_pg_host, settings.pg_tls_cert, settings.pg_tls_key
    )


async def serve(settings: Settings, slot: WorkerSlot | None = None, unix_fd: int | None = None) -> None:
    material = _material(settings)
    channels = Channels(settings)
    signer = Signer(keys.internal_secret(settings), SERVICE_NAME)
    metrics = GatewayMetrics()
    start_http_server(metrics_port(settings, slot), addr=settings.pg_host, registry=metrics.registry)
    server = GatewayServer(
        config_from(settings, slot, unix_fd), GrpcControlPlane(channels, signer), material, metrics
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "PG Gateway worker %d ready on %s:%d (TLS; CA: %s; metrics on :%d)%s",
        slot.index if slot is not None else 0,
        settings.pg_host,
        server.port,
        material.ca_path or material.cert_path,
        metrics_port(settings, slot),
        f" and on {server.unix_path}" if server.unix_path else "",
    )
    try:
        await stop.wait()
    finally:
        log.info("PG Gateway worker stopping")
        await server.stop()
        await channels.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pggateway.main", description="The PG Gateway.")
    add_worker_arguments(parser)
    # The supervisor's listening Unix socket, inherited (not for people).
    parser.add_argument("--unix-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = Settings.load()
    setup_logging(settings.log_level)
    slot = slot_from_args(args)
    if slot is None:
        _material(settings)
        # One process binds the socket file (AF_UNIX has no SO_REUSEPORT): this one, before
        # the workers, which all accept on it.
        where = settings.pg_socket_path()
        sock = pg_socket.bind(where, settings.pg_port) if where is not None else None
        extra = ("--unix-fd", str(sock.fileno())) if sock is not None else ()
        supervisor = Supervisor(
            worker_count(settings.pg_workers),
            module_command("pggateway.main", *extra),
            pass_fds=(sock.fileno(),) if sock is not None else (),
        )
        try:
            code = supervisor.run()
        finally:
            if sock is not None and where is not None:
                sock.close()
                pg_socket.unlink(where, settings.pg_port)
        sys.exit(code)
    die_with_parent()
    setup_tracing("ctrlmesh-pggateway", settings.trace_sample_ratio)
    uvloop.run(serve(settings, slot, args.unix_fd))


if __name__ == "__main__":
    main()
