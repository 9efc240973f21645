"""The clusters service process: `python -m services.clusters.main`.

Serves the Zectre surface (ClusterService, NodeService, ManagedDatabaseService, TemplateService,
PlatformService), its EventStreamService and the internal TenantResourcesService, and runs two
loops: the node heartbeat, which asks every cluster's engine for its nodes every
`CTRLMESH_NODE_POLL_INTERVAL`, and the follower of credential rotations, which gives every bound
app its tenant's new password and rolls it; once at start it undoes the operations a dead
process left half-made (services/clusters/intents.py). At start it registers the `local` cluster `main` for the
configured Docker engine.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from libs.grpc_server import AuditSink, Service
from libs.outbox import Outbox
from libs.reconcile import every
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import Count, Spec, register_resources
from services.clusters import servicer
from services.clusters.apps import TemplatesDomain
from services.clusters.domain import ClustersDomain
from services.clusters.intents import Intents
from services.clusters.managed import Connection, InstanceSecrets, ManagedDatabases
from services.clusters.models import SCHEMA, managed_databases, outbox
from services.clusters.peers import Accounts, Databases, Instances, Secrets
from services.clusters.platform import Platform, server_versions

log = logging.getLogger("ctrlmesh.clusters")


def spec() -> Spec:
    return Spec(
        counts=[Count("managed_databases", managed_databases)],
        # The backing databases are the databases service's to purge.
        purge=[managed_databases],
        stats=[Count("managed_databases", managed_databases)],
    )


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    s = rt.settings
    box = Outbox(outbox, rt.db)
    accounts = Accounts(rt.channels, rt.signer)
    # A create runs initdb: seconds, not the default deadline's fraction of one.
    databases = Databases(rt.channels, rt.signer, timeout=30)
    instances = Instances(rt.channels, rt.signer, timeout=15)
    intents = Intents(rt.db, databases, instances)
    clusters = ClustersDomain(
        rt.db,
        box,
        local_endpoint=s.docker_host or "",
        poll_interval=s.node_poll_interval.total_seconds(),
        not_ready_after=s.node_not_ready_after,
        down_after=s.node_down_after,
    )
    managed = ManagedDatabases(
        rt.db,
        box,
        accounts,
        databases,
        instances,
        # The gateway's own CA (made at its first start), unless certificates were given.
        InstanceSecrets(
            Secrets(rt.channels, rt.signer),
            None if s.pg_tls_cert else s.data_dir / "pggateway" / "ca.crt",
        ),
        gateway=Connection(s.public_pg_host, s.pg_port, socket=s.pg_socket_path() is not None),
        versions=server_versions(),
        intents=intents,
    )
    templates = TemplatesDomain(rt.db, box, instances, managed)
    platform = Platform(rt.db, s, accounts, databases, instances)

    undoing: list[asyncio.Task[None]] = []

    async def on_start() -> None:
        await clusters.register_local()
        # Before serving: a client retrying the request the dead process was in must not race
        # the undo of its half-made first try. Bounded, so a peer still starting cannot hold
        # the service down; the pass then goes on in the background.
        task = asyncio.create_task(recover())
        undoing.append(task)
        done, _ = await asyncio.wait({task}, timeout=30)
        if not done:
            log.warning("still undoing the operations of a dead process; serving meanwhile")

    async def heartbeat() -> None:
        await every("node heartbeat", clusters.poll_interval, clusters.poll, first=0)

    async def recover() -> None:
        # Until one pass succeeds (the services it calls may still be starting), then done.
        while True:
            try:
                await intents.recover()
                return
            except Exception:
                log.warning("undoing the operations of a dead process failed; retrying", exc_info=True)
                await asyncio.sleep(1)

    def register(server: grpc.aio.Server) -> list[str]:
        return [
            *servicer.register(server, clusters, managed, templates, platform),
            *register_resources(server, rt.db, spec()),
        ]

    service = Service(
        name="clusters",
        register=register,
        on_start=on_start,
        on_stop=clusters.close,
        events=box,
        background=[heartbeat, managed.rotation_loop],
    )
    return service, remote_audit_sink(rt)


if __name__ == "__main__":
    run("clusters", SCHEMA, Path(__file__).parent / "migrations", build)
