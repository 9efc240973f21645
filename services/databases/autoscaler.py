"""The writer autoscaler: who may ask for a profile handoff, and the policy that asks by itself.

`HandoffDomain.request` is the one way a handoff begins (the internal RequestHandoff RPC,
`make handoff`, the policy): under the row lock it checks the database is `ready`, not in a
handoff or its cooldown, and that the profile is within the plan's sizes and
CTRLMESH_AUTOSCALE_MAX_PROFILE; then it records PREPARING with the candidate and kicks the
reconciler (actions/handoff.py does the rest).

The policy (`Autoscaler.pass_`, every CTRLMESH_AUTOSCALE_INTERVAL) samples each ready database:
its writer's CPU use from the cgroup as a fraction of the profile's quota, and the checkouts its
gateways had to queue per second (from their lease renewals). Decisions, where SPG99 is silent:
- up one profile when, over the last CTRLMESH_AUTOSCALE_WINDOW, the mean CPU use is at least
  CTRLMESH_AUTOSCALE_CPU_UP or the queued checkouts at least CTRLMESH_AUTOSCALE_WAITS_UP per s;
- down one profile only after twice that window with every sample at most
  CTRLMESH_AUTOSCALE_CPU_DOWN and no queued checkout (hysteresis: a lower threshold and a
  longer window down than up, so a bursty load does not flap);
- never during a handoff or before `autoscale_cooldown_until` (a failed handoff has one too);
- a window that is not yet full (after a start or a handoff) decides nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

from libs.db import Database
from libs.errors import InvalidState, LimitExceeded, NotFound, PermissionDenied, not_found
from libs.principal import Principal, is_global, is_system, system_principal
from libs.reconcile import every
from libs.timeutil import now
from services.databases import repository as repo
from services.databases.actions.common import spec_of
from services.databases.actions.handoff import candidate_worker_id, scale_transition
from services.databases.compute.profiles import SIZES, profile
from services.databases.lifecycle import Lifecycle
from services.databases.peers import Accounts
from services.databases.repository import Db
from services.databases.state import HANDOFF_ACTIVE, ScaleState, State

log = logging.getLogger("ctrlmesh.databases.autoscaler")


@dataclass(frozen=True)
class PolicyConfig:
    interval: timedelta = timedelta(seconds=5)
    window: timedelta = timedelta(seconds=60)
    cpu_up: float = 0.75
    cpu_down: float = 0.25
    waits_up: float = 5.0
    max_profile: str = "L2"
    enabled: bool = True


def allowed_profiles(plan_sizes: tuple[str, ...], max_profile: str) -> tuple[str, ...]:
    """The profiles a database may run on: the plan's sizes (all when it names none), up to the
    live contract's bound."""
    return tuple(p for p in SIZES if p <= max_profile and (not plan_sizes or p in plan_sizes))


class HandoffDomain:
    def __init__(self, db: Database, accounts: Accounts, lifecycle: Lifecycle, max_profile: str):
        self.db = db
        self.accounts = accounts
        self.lifecycle = lifecycle
        self.max_profile = max_profile

    async def allowed(self, tenant_id: str) -> tuple[str, ...]:
        limits = await self.accounts.limits(tenant_id)
        return allowed_profiles(limits.sizes, self.max_profile)

    async def request(self, p: Principal, db_id: str, target: str, reason: str = "operator") -> Db:
        if not (is_system(p) or is_global(p)):
            raise PermissionDenied("handoffs are asked for by the platform or a global key")
        async with self.db.session() as s:
            tenant_id = await repo.owner_of(s, db_id)
        if tenant_id is None:
            raise not_found("database", db_id)
        allowed = await self.allowed(tenant_id)
        if target not in allowed:
            raise LimitExceeded(
                f"profile {target} is not allowed for this database (allowed: {', '.join(allowed)})",
                details={"limit": "profiles", "allowed": ",".join(allowed)},
            )
        async with self.db.session() as s:
            row = await repo.get(s, tenant_id, db_id, lock=True)
            if row is None or row.state == State.DELETING:
                raise not_found("database", db_id)
            if row.state != State.READY:
                raise InvalidState(
                    f"the database is {row.state}: only a running writer is handed off",
                    details={"state": row.state},
                )
            if ScaleState(row.scale_state) in HANDOFF_ACTIVE:
                raise InvalidState(
                    f"a handoff is in progress ({row.scale_state})", details={"scale_state": row.scale_state}
                )
            t = now()
            if row.autoscale_cooldown_until is not None and row.autoscale_cooldown_until > t:
                raise InvalidState(
                    f"in cooldown until {row.autoscale_cooldown_until.isoformat()}",
                    details={"autoscale_cooldown_until": row.autoscale_cooldown_until.isoformat()},
                )
            if target == row.current_profile:
                raise InvalidState(f"the writer already runs on {target}", details={"profile": target})
            if row.scale_state == ScaleState.COOLDOWN:
                row = await scale_transition(self.lifecycle, s, row, ScaleState.STEADY)
            term = row.lease_control_epoch + 1
            row = await scale_transition(
                self.lifecycle,
                s,
                row,
                ScaleState.PREPARING,
                {
                    "target_profile": target,
                    "candidate_profile": target,
                    "candidate_worker_id": candidate_worker_id(row, term),
                    "candidate_writer_term": term,
                    "scale_failure_reason": None,
                },
                self.lifecycle.handoff.prepare_timeout,
                reason=reason,
            )
        await self.lifecycle.committed(db_id)
        self.lifecycle.kick(tenant_id, db_id)
        log.info("handoff of %s %s → %s accepted (%s)", db_id, row.current_profile, target, reason)
        return row


@dataclass
class _Sample:
    at: float
    cpu: float | None  # fraction of the quota
    waits: float  # queued checkouts per second


@dataclass
class _Last:
    at: float
    epoch: int
    cpu_seconds: float | None
    waits: int


class Autoscaler:
    def __init__(self, lifecycle: Lifecycle, handoffs: HandoffDomain, config: PolicyConfig):
        self.lc = lifecycle
        self.handoffs = handoffs
        self.config = config
        self._samples: dict[str, deque[_Sample]] = {}
        self._last: dict[str, _Last] = {}
        self._principal = system_principal("databases-autoscaler")

    async def loop(self) -> None:
        await every("autoscale", self.config.interval.total_seconds(), self.pass_)

    async def pass_(self) -> None:
        async with self.lc.db.session() as s:
            keys = await repo.keys_in_states(s, (State.READY.value,))
        seen = set()
        for tenant_id, db_id in keys:
            seen.add(db_id)
            await self._one(tenant_id, db_id)
        for gone in set(self._samples) - seen:
            self._samples.pop(gone, None)
            self._last.pop(gone, None)

    async def _end_cooldown(self, db: Db) -> None:
        async with self.lc.db.session() as s:
            cur = await repo.get(s, db.tenant_id, db.id, lock=True)
            if cur is not None and cur.scale_state == ScaleState.COOLDOWN:
                await scale_transition(self.lc, s, cur, ScaleState.STEADY)
        await self.lc.committed(db.id)

    async def _one(self, tenant_id: str, db_id: str) -> None:
        async with self.lc.db.session() as s:
            db = await repo.get(s, tenant_id, db_id)
            if db is None:
                return
            report = await repo.drain_report(s, db, now())
        t_now = now()
        cooling = db.autoscale_cooldown_until is not None and db.autoscale_cooldown_until > t_now
        if db.scale_state == ScaleState.COOLDOWN and not cooling:
            await self._end_cooldown(db)
        if ScaleState(db.scale_state) in HANDOFF_ACTIVE:
            self._samples.pop(db_id, None)
            self._last.pop(db_id, None)
            return
        self._sample(db, await self.lc.driver.cpu_seconds(spec_of(db)), report.waits)
        if not self.config.enabled or cooling:
            return
        target = await self._decide(db)
        if target is None:
            return
        try:
            await self.handoffs.request(self._principal, db_id, target, reason="policy")
        except (InvalidState, LimitExceeded, NotFound) as err:
            log.info("autoscaler: no handoff of %s to %s: %s", db_id, target, err)
        self._samples.pop(db_id, None)
        self._last.pop(db_id, None)

    def _sample(self, db: Db, cpu_seconds: float | None, waits: int) -> None:
        t = time.monotonic()
        last = self._last.get(db.id)
        self._last[db.id] = _Last(t, db.lease_control_epoch, cpu_seconds, waits)
        if last is None or last.epoch != db.lease_control_epoch or t - last.at <= 0:
            return  # a new writer generation: its counters start again
        dt = t - last.at
        cpu = None
        if cpu_seconds is not None and last.cpu_seconds is not None:
            cpu = max(0.0, cpu_seconds - last.cpu_seconds) / dt / profile(db.current_profile).vcpu
        rate = max(0, waits - last.waits) / dt
        samples = self._samples.setdefault(db.id, deque())
        samples.append(_Sample(t, cpu, rate))
        horizon = 2 * self.config.window.total_seconds() + self.config.interval.total_seconds()
        while samples and samples[0].at < t - horizon:
            samples.popleft()

    def _over(self, db_id: str, seconds: float) -> list[_Sample] | None:
        """The samples of the last `seconds`, or None when they do not yet cover that span."""
        samples = self._samples.get(db_id)
        if not samples:
            return None
        t = samples[-1].at
        # Each sample covers the interval before it.
        if t - samples[0].at + self.config.interval.total_seconds() < seconds * 0.95:
            return None
        return [x for x in samples if x.at >= t - seconds]

    async def _decide(self, db: Db) -> str | None:
        cfg = self.config
        allowed = await self.handoffs.allowed(db.tenant_id)
        if db.current_profile not in allowed:
            return None
        i = allowed.index(db.current_profile)
        win = cfg.window.total_seconds()
        recent = self._over(db.id, win)
        if recent and i + 1 < len(allowed):
            cpus = [x.cpu for x in recent if x.cpu is not None]
            cpu = sum(cpus) / len(cpus) if cpus else 0.0
            waits = sum(x.waits for x in recent) / len(recent)
            if cpu >= cfg.cpu_up or waits >= cfg.waits_up:
                log.info("autoscaler: %s busy (cpu %.2f, waits %.1f/s): up", db.id, cpu, waits)
                return allowed[i + 1]
        longer = self._over(db.id, 2 * win)
        if longer and i > 0:
            if all((x.cpu or 0.0) <= cfg.cpu_down and x.waits == 0 for x in longer):
                log.info("autoscaler: %s quiet for %.0f s: down", db.id, 2 * win)
                return allowed[i - 1]
        return None
