"""The instances service's figures for the platform's dashboards and alerts (ops/): instances by
provider and state, whether each engine answers, and health-check outcomes.

The gauges are refreshed from one GROUP BY on every provider probe (the interval is
CTRLMESH_PROVIDER_PROBE_INTERVAL), and every (provider, state) pair is written each time, so
a state nothing is in reads 0 instead of disappearing. Labels are bounded sets: registry keys,
`specs.STATES`, check outcomes — never tenant or instance ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import Counter, Gauge
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.instances.models import instances
from services.instances.specs import STATES

INSTANCES = Gauge(
    "ctrlmesh_instances", "Instances by provider and state (destroyed ones left out)", ["provider", "state"]
)
PROVIDER_UP = Gauge(
    "ctrlmesh_instance_provider_up", "1 when the engine answered its last probe", ["provider"]
)
HEALTH_CHECKS = Counter("ctrlmesh_instance_health_checks_total", "Health checks run, by outcome", ["status"])
for _status in ("healthy", "unhealthy"):
    HEALTH_CHECKS.labels(_status)

_LIVE_STATES = tuple(s for s in STATES if s != "destroyed")


async def observe(s: AsyncSession, providers: Iterable[str], up: Mapping[str, bool]) -> None:
    """Refresh the gauges: `providers` the configured registry keys, `up` what their probe said."""
    t = instances
    q = (
        select(t.c.provider_name, t.c.state, func.count())
        .where(t.c.state != "destroyed")
        .group_by(t.c.provider_name, t.c.state)
    )
    counts = {(p, st): int(n) for p, st, n in (await s.execute(q)).all()}
    for provider in sorted(set(providers) | {p for p, _ in counts}):
        for state in _LIVE_STATES:
            INSTANCES.labels(provider, state).set(counts.get((provider, state), 0))
    for provider, ok in up.items():
        PROVIDER_UP.labels(provider).set(1 if ok else 0)
