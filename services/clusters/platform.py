"""`/api/v1/stats` and `/api/v1/platform/config`.

Stats are counted live through the other services' APIs with the caller's own principal, so
each service applies the caller's visibility: a tenant key sees its tenant's apps (instances),
their deployments, tasks (the running replicas of running instances), its databases and one
tenant; nodes are the platform's (every key sees the same nodes). The config is read from the
running settings.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from dataclasses import dataclass
from typing import Any

from libs import principal as principals
from libs.embedded_pg import EmbeddedPostgresError, find_pg_bindir
from libs.settings import Settings
from services.clusters import repository as repo
from services.clusters.peers import Accounts, Databases, Instances


def server_versions() -> tuple[str, ...]:
    """The PostgreSQL major versions the databases service runs (its server binaries')."""
    try:
        out = subprocess.run(
            [str(find_pg_bindir() / "postgres"), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (EmbeddedPostgresError, OSError, subprocess.SubprocessError):
        return ("16",)
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    return (m.group(1),) if m else ("16",)


@dataclass(frozen=True)
class Stats:
    apps: int
    deployments: int
    tasks: int
    nodes: int
    databases: int
    tenants: int


class Platform:
    def __init__(
        self, db: Any, settings: Settings, accounts: Accounts, databases: Databases, instances: Instances
    ):
        self.db = db
        self.settings = settings
        self.accounts = accounts
        self.databases = databases
        self.instances = instances

    async def stats(self, p: principals.Principal) -> Stats:
        tenants, apps = await asyncio.gather(self.accounts.tenants(p), self.instances.all(p))
        dbs, deps = await asyncio.gather(
            asyncio.gather(*(self.databases.count(p, t.id) for t in tenants)),
            self.instances.deployment_count(p, [a.id for a in apps]),
        )
        async with self.db.session() as s:
            nodes = await repo.count_nodes(s)
        return Stats(
            apps=len(apps),
            deployments=deps,
            tasks=sum(a.replicas for a in apps if a.state == "running"),
            nodes=nodes,
            databases=sum(dbs),
            tenants=len(tenants),
        )

    def config(self) -> dict[str, Any]:
        s = self.settings
        return {
            "version": s.version,
            "gateway": {"host": s.public_pg_host, "port": s.pg_port, "sslmode": "require"},
            "ingress": {
                "domain": s.ingress_domain,
                "http_port": s.ingress_http_port,
                "https_port": s.ingress_https_port,
            },
            "features": {
                "serverless_postgres": True,
                "managed_databases": True,
                "templates": True,
                "node_drain": True,
                "swarm_clusters": True,
                "managed_clusters": False,
                "secrets": True,
                "custom_domains": True,
            },
        }
