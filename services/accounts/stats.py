"""Platform-wide counts for the Ctrl Plane admin: accounts' own, plus every owning service's."""

from __future__ import annotations

from typing import Protocol

from libs.db import Database
from libs.principal import Principal
from services.accounts import repository as repo
from services.accounts.access import require_global


class StatsSource(Protocol):
    async def stats(self) -> dict[str, int]: ...


class Stats:
    def __init__(self, db: Database, peers: StatsSource):
        self.db = db
        self.peers = peers

    async def system_stats(self, p: Principal) -> dict[str, int]:
        require_global(p)
        async with self.db.session() as s:
            by_status, accounts, keys = await repo.platform_counts(s)
        peer = await self.peers.stats()
        return {
            "total_tenants": sum(by_status.values()),
            "active_tenants": by_status.get("active", 0),
            "suspended_tenants": by_status.get("suspended", 0),
            "total_accounts": accounts,
            "total_api_keys": keys,
            "total_instances": peer.get("instances", 0),
            "running_instances": peer.get("running_instances", 0),
            "total_providers": peer.get("providers", 0),
            "healthy_providers": peer.get("healthy_providers", 0),
            "total_databases": peer.get("databases", 0),
            "running_databases": peer.get("running_databases", 0),
        }
