"""Plans and the billing summary: the caps of each plan and this period's usage against them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from libs.db import Database
from libs.errors import not_found
from libs.principal import Principal
from libs.timeutil import now
from services.accounts import repository as repo
from services.accounts.access import scope_of


@dataclass(frozen=True)
class Plan:
    name: str
    max_tenants: int  # 0 = no cap
    max_databases: int
    max_compute_cu_hours: float
    max_egress_bytes: int
    sizes: tuple[str, ...]


PLANS = {
    "trial": Plan("trial", 1, 2, 10.0, 5 * 1024**3, ("L1",)),
    "standard_payg": Plan("standard_payg", 0, 0, 0.0, 0, ("L1", "L2", "L3", "L4", "L5")),
}


def plan_of(name: str) -> Plan:
    """The plan of that name; an unknown one is pay-as-you-go (no caps)."""
    return PLANS.get(name, PLANS["standard_payg"])


class Counter(Protocol):
    """The one thing billing needs of the other services: their per-tenant counts."""

    async def count(self, tenant_ids: list[str]) -> dict[str, dict[str, int]]: ...


@dataclass(frozen=True)
class Usage:
    tenants: int = 0
    databases: int = 0
    compute_cu_hours: float = 0.0
    by_profile: dict[str, float] = field(default_factory=dict)
    storage_bytes: int = 0
    egress_bytes: int = 0


@dataclass(frozen=True)
class BillingSummary:
    account_plan: str  # as the account names it (an unknown name bills as pay-as-you-go)
    plan: Plan
    period_start: datetime
    period_end: datetime
    usage: Usage
    # Percent of each capped limit used; only for whole-account usage.
    limit_used_percent: dict[str, float]


def period_of(t: datetime) -> tuple[datetime, datetime]:
    """The calendar month (UTC) that `t` falls in."""
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def merge_usage(n_tenants: int, counts: dict[str, dict[str, int]]) -> Usage:
    """The usage of a set of tenants from the owning services' counts."""
    databases = storage = egress = 0
    by_profile: dict[str, float] = {}
    for c in counts.values():
        databases += c.get("databases", 0)
        storage += c.get("storage_bytes", 0)
        egress += c.get("egress_bytes", 0)
        for k, v in c.items():
            if k.startswith("compute_cu_millihours_"):
                prof = k.removeprefix("compute_cu_millihours_")
                by_profile[prof] = by_profile.get(prof, 0.0) + v / 1000
    return Usage(n_tenants, databases, sum(by_profile.values()), by_profile, storage, egress)


def limit_used_percent(plan: Plan, usage: Usage) -> dict[str, float]:
    """Percent of each of the plan's caps used (uncapped limits are left out)."""
    percent: dict[str, float] = {}
    for key, cap, value in (
        ("tenants", plan.max_tenants, usage.tenants),
        ("databases", plan.max_databases, usage.databases),
        ("compute_cu_hours", plan.max_compute_cu_hours, usage.compute_cu_hours),
        ("egress_bytes", plan.max_egress_bytes, usage.egress_bytes),
    ):
        if cap:
            percent[key] = round(100.0 * value / cap, 2)
    return percent


class Billing:
    def __init__(self, db: Database, peers: Counter):
        self.db = db
        self.peers = peers

    async def summary(self, p: Principal) -> BillingSummary:
        """The account's plan and this period's usage; for a tenant-scoped key the usage of its
        own tenant only (other tenants' databases and storage are not its to see)."""
        async with self.db.session() as s:
            acct = await repo.get_account(s, p.account_id)
            if acct is None:
                raise not_found("account", p.account_id)
            tenant_ids = await repo.tenant_ids(s, scope_of(p), acct.id)
        plan = plan_of(acct.plan)
        start, end = period_of(now())
        usage = merge_usage(len(tenant_ids), await self.peers.count(tenant_ids))
        # Percent of the account's caps only for whole-account usage: a tenant's share would
        # invite reading the rest of the account from it.
        percent = limit_used_percent(plan, usage) if p.scope != "tenant" else {}
        return BillingSummary(acct.plan, plan, start, end, usage, percent)
