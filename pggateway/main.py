"""`python -m pggateway.main`: the PG Gateway process.

Settings → logging and tracing → TLS material (generated on first start) → the gRPC control
plane (accounts for credentials, databases for leases, with a signed system principal) →
Prometheus on CTRLMESH_PG_METRICS_PORT → the listener, on uvloop. SIGTERM/SIGINT stop it
gracefully: clients are told (57P01), leases are released.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid

import uvloop
from prometheus_client import start_http_server

from libs import keys
from libs.clients import Channels, Signer
from libs.settings import Settings
from libs.telemetry import setup_logging, setup_tracing
from pggateway.controlplane import GrpcControlPlane
from pggateway.metrics import GatewayMetrics
from pggateway.server import GatewayConfig, GatewayServer
from pggateway.tls import ensure_material

log = logging.getLogger("ctrlmesh.pggateway")

SERVICE_NAME = "pggateway"


def metrics_port(settings: Settings) -> int:
    return settings.pg_metrics_port if settings.pg_metrics_port is not None else settings.pg_port + 1000


def config_from(settings: Settings) -> GatewayConfig:
    return GatewayConfig(
        host=settings.pg_host,
        port=settings.pg_port,
        # This process: one lease per (holder, database), so a restarted gateway is a new holder.
        holder_id=f"pggateway:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        pool_size=settings.pg_pool_size,
        wake_timeout=settings.pg_wake_timeout.total_seconds(),
        checkout_timeout=settings.pg_checkout_timeout.total_seconds(),
        lease_ttl=settings.pg_lease_ttl.total_seconds(),
        credentials_ttl=settings.pg_credentials_cache_ttl.total_seconds(),
        max_prepared_statements=settings.pg_max_prepared_statements,
    )


async def serve(settings: Settings) -> None:
    material = ensure_material(
        settings.data_dir, settings.public_pg_host, settings.pg_tls_cert, settings.pg_tls_key
    )
    channels = Channels(settings)
    signer = Signer(keys.internal_secret(settings), SERVICE_NAME)
    metrics = GatewayMetrics()
    start_http_server(metrics_port(settings), addr=settings.pg_host, registry=metrics.registry)
    server = GatewayServer(config_from(settings), GrpcControlPlane(channels, signer), material, metrics)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "PG Gateway ready on %s:%d (TLS; CA: %s; metrics on :%d)",
        settings.pg_host,
        server.port,
        material.ca_path or material.cert_path,
        metrics_port(settings),
    )
    try:
        await stop.wait()
    finally:
        log.info("PG Gateway stopping")
        await server.stop()
        await channels.close()


def main() -> None:
    settings = Settings.load()
    setup_logging(settings.log_level)
    setup_tracing("ctrlmesh-pggateway")
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
