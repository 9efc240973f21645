"""`python -m pggateway.standalone`: the gateway in front of one always-ready compute.

No control-plane services: one tenant, one role and one database at a fixed address, given on the
command line (the role's password in CTRLMESH_STANDALONE_PG_PASSWORD). The listener, pooling,
TLS, SCRAM and the multi-worker supervisor are the production ones; only the four control-plane
calls are answered locally. For benchmarks (`bench/pg_gateway.py`) and the multi-process tests,
where the figures should be the relay's and not the control plane's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import uvloop
from prometheus_client import start_http_server

from pggateway.controlplane import ControlMessage, ControlPlaneError, Credentials, LeaseInfo, LeaseReport
from pggateway.metrics import GatewayMetrics
from pggateway.scram import Verifier
from pggateway.server import GatewayConfig, GatewayServer
from pggateway.tls import ensure_material
from pggateway.workers import (
    Supervisor,
    WorkerSlot,
    add_worker_arguments,
    die_with_parent,
    module_command,
    slot_from_args,
    worker_pool_size,
)

PASSWORD_ENV = "CTRLMESH_STANDALONE_PG_PASSWORD"


class StaticControlPlane:
    """One tenant and one database that is always ready at a fixed address."""

    def __init__(self, tenant_id: str, user: str, password: str, host: str, port: int, database: str) -> None:
        verifier = Verifier.from_password(password).text()
        self._creds = Credentials(tenant_id, tenant_id, user, verifier, "active", password)
        self._lease = LeaseInfo(
            f"lease-{database}", f"db-{database}", 1, "ready", host, port, False, database
        )
        self._user = user

    async def lookup_credentials(self, pg_user: str) -> Credentials:
        if pg_user != self._user:
            raise ControlPlaneError(grpc.StatusCode.NOT_FOUND, "NotFound", f"pg_user {pg_user!r} not found")
        return self._creds

    async def acquire_lease(
        self, tenant_id: str, database: str, holder_id: str, ttl: float, wait: float
    ) -> LeaseInfo:
        return self._lease

    async def renew_lease(
        self,
        lease_id: str,
        epoch: int,
        ttl: float,
        active_connections: int,
        report: LeaseReport | None = None,
    ) -> LeaseInfo:
        return self._lease

    async def release_lease(self, lease_id: str, epoch: int) -> None:
        return None

    async def watch_control(self, holder_id: str) -> AsyncIterator[ControlMessage]:
        """No control plane, so no handoff: HELLO, then silence."""
        yield ControlMessage("HELLO")
        await asyncio.Event().wait()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pggateway.standalone", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--compute-host", default="127.0.0.1")
    ap.add_argument("--compute-port", type=int, required=True)
    ap.add_argument("--database", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--tenant-id", default="ten_standalone")
    ap.add_argument("--data-dir", type=Path, required=True, help="where the TLS material is made")
    ap.add_argument("--pool-size", type=int, default=20, help="backends per database, shared by the workers")
    ap.add_argument("--workers", dest="count", type=int, default=1, help="worker processes")
    ap.add_argument("--metrics-port", type=int, default=None, help="worker i serves metrics on this + i")
    ap.add_argument(
        "--max-prepared",
        type=int,
        default=GatewayConfig.max_prepared_statements,
        help="named prepared statements kept per backend (0: a named statement pins)",
    )
    add_worker_arguments(ap)
    return ap


async def _serve(args: argparse.Namespace, slot: WorkerSlot) -> None:
    material = ensure_material(args.data_dir, "localhost")
    metrics = GatewayMetrics()
    if args.metrics_port is not None:
        start_http_server(args.metrics_port + slot.index, addr=args.host, registry=metrics.registry)
    config = GatewayConfig(
        args.host,
        args.port,
        f"standalone-{os.getpid()}",
        pool_size=worker_pool_size(args.pool_size, slot.count),
        max_prepared_statements=args.max_prepared,
        worker_index=slot.index,
        peers=slot.peers(),
    )
    cp = StaticControlPlane(
        args.tenant_id,
        args.user,
        os.environ[PASSWORD_ENV],
        args.compute_host,
        args.compute_port,
        args.database,
    )
    server = GatewayServer(config, cp, material, metrics)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(raw)
    slot = slot_from_args(args)
    if slot is None:
        ensure_material(args.data_dir, "localhost")  # once, before the workers start
        supervisor = Supervisor(args.count, module_command("pggateway.standalone", *raw))
        sys.exit(supervisor.run())
    die_with_parent()
    uvloop.run(_serve(args, slot))


if __name__ == "__main__":
    main()
