"""The handoff's rules as plain data: the phase order, which action a database in a handoff gets,
the profiles a plan allows, the policy's hysteresis, and the cgroup files a profile writes."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

from services.databases.autoscaler import Autoscaler, PolicyConfig, _Sample, allowed_profiles
from services.databases.compute.cgroups import Cgroups
from services.databases.compute.profiles import PROFILES
from services.databases.state import (
    HANDOFF_ACTIVE,
    HANDOFF_ORDER,
    Action,
    ScaleState,
    can_scale,
    next_action,
)


def test_phases_follow_spg99_order_or_fail() -> None:
    """Each phase of §6.2 leads to the next one or to FAILED; SWITCHING only forward."""
    for a, b in itertools.pairwise(HANDOFF_ORDER):
        assert can_scale(a, b)
    assert can_scale(ScaleState.COOLDOWN, ScaleState.STEADY)
    for phase in HANDOFF_ACTIVE - {ScaleState.SWITCHING}:
        assert can_scale(phase, ScaleState.FAILED)
    assert not can_scale(ScaleState.STEADY, ScaleState.FREEZING)
    assert not can_scale(ScaleState.DRAINING, ScaleState.STARTING_NEW)  # never start before the stop


def test_a_ready_database_in_a_handoff_is_the_handoffs() -> None:
    """A writer stopped on purpose by the handoff is not `lost`; outside a handoff it is."""
    for phase in HANDOFF_ACTIVE:
        assert next_action("ready", 1, False, phase) is Action.HANDOFF
        assert next_action("ready", 1, None, phase) is Action.HANDOFF
    assert next_action("ready", 1, False, "COOLDOWN") is Action.LOST
    assert next_action("ready", 1, True, "FAILED") is Action.NONE
    assert next_action("deleting", 0, None, "DRAINING") is Action.DELETE


def test_plan_and_live_bound_limit_the_profiles() -> None:
    """Trial allows L1 only (the policy never moves it); the live contract stops at L2 by default."""
    assert allowed_profiles(("L1",), "L2") == ("L1",)
    assert allowed_profiles(("L1", "L2", "L3", "L4", "L5"), "L2") == ("L1", "L2")
    assert allowed_profiles((), "L5") == ("L1", "L2", "L3", "L4", "L5")


class _Handoffs:
    def __init__(self, allowed: tuple[str, ...]):
        self._allowed = allowed

    async def allowed(self, tenant_id: str) -> tuple[str, ...]:
        return self._allowed


class _Db:
    def __init__(self, profile: str):
        self.id = "db"
        self.tenant_id = "ten"
        self.current_profile = profile


def _policy(samples: list[tuple[float, float]], profile: str, allowed: tuple[str, ...] = ("L1", "L2")) -> Any:
    cfg = PolicyConfig(timedelta(seconds=1), window=timedelta(seconds=10), cpu_up=0.75, cpu_down=0.25)
    a = Autoscaler(lifecycle=None, handoffs=_Handoffs(allowed), config=cfg)  # type: ignore[arg-type]
    now = time.monotonic()
    a._samples["db"] = deque(
        _Sample(now - (len(samples) - i - 1), cpu, waits) for i, (cpu, waits) in enumerate(samples)
    )
    return asyncio.run(a._decide(_Db(profile)))  # type: ignore[arg-type]


def test_policy_hysteresis() -> None:
    """Up after one full window of high CPU or queued checkouts; down only after two windows
    all quiet; a window not yet full decides nothing; the top of the plan never goes up."""
    assert _policy([(0.9, 0)] * 10, "L1") == "L2"
    assert _policy([(0.1, 8.0)] * 10, "L1") == "L2"
    assert _policy([(0.9, 0)] * 5, "L1") is None  # half a window
    assert _policy([(0.9, 0)] * 10, "L2") is None  # L2 is the bound
    assert _policy([(0.1, 0)] * 10, "L2") is None  # one quiet window is not enough to go down
    assert _policy([(0.1, 0)] * 20, "L2") == "L1"
    assert _policy([(0.1, 0)] * 19 + [(0.5, 0)], "L2") is None  # not all quiet
    assert _policy([(0.9, 0)] * 20, "L1", allowed=("L1",)) is None  # trial


def test_cgroup_v1_files_carry_the_profile(tmp_path: Path) -> None:
    """On a v1 layout the group gets cfs quota = vcpu * period and the memory limit; the spawn
    command joins every controller before it execs."""
    for c in ("cpu", "memory", "cpuacct"):
        (tmp_path / c).mkdir()
    cg = Cgroups(root=tmp_path)
    assert cg.status().mode == "cgroup-v1" and cg.status().enforced
    cg.make("db1-g3", PROFILES["L2"])
    assert cg.limits_of("db1-g3") == {
        "cpu_quota_us": 200000,
        "cpu_period_us": 100000,
        "memory_bytes": 2 << 30,
    }
    cmd = cg.wrap("db1-g3", ["postgres", "-D", "x"])
    assert cmd[:2] == ["/bin/sh", "-c"] and cmd[-3:] == ["postgres", "-D", "x"]
    for c in ("cpu", "memory", "cpuacct"):
        assert str(tmp_path / c / "ctrlmesh" / "db1-g3" / "cgroup.procs") in cmd[2]
    assert cg.groups("db1") == ["db1-g3"]


def test_no_writable_cgroup_says_so(tmp_path: Path) -> None:
    """Without a writable hierarchy nothing is enforced, and the status says why."""
    cg = Cgroups(root=tmp_path / "absent")
    assert not cg.status().enforced and "no writable cgroup" in cg.status().detail
    assert cg.wrap("g", ["postgres"]) == ["postgres"]


def test_one_trace_per_handoff_with_a_span_per_phase() -> None:
    """Each phase left becomes a child span of the handoff's root span; the root ends with the
    result, so a handoff is one trace."""
    from dataclasses import fields
    from datetime import UTC, datetime

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import services.databases.actions  # noqa: F401 (the package re-exports the function `handoff`)
    from services.databases.repository import Db

    handoff = sys.modules["services.databases.actions.handoff"]

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved, handoff.tracer = handoff.tracer, provider.get_tracer("test")
    try:
        base: dict[str, Any] = {f.name: None for f in fields(Db)}
        base.update(id="db1", current_profile="L1", target_profile="L2", candidate_profile="L2")
        base.update(candidate_writer_term=7)
        t = datetime(2026, 1, 1, tzinfo=UTC)
        phases = ["PREPARING", "FREEZING", "DRAINING", "STOPPING_OLD", "STARTING_NEW", "SWITCHING"]
        for i, phase in enumerate(phases):
            db = Db(**{**base, "scale_state": phase, "scale_phase_started_at": t + timedelta(seconds=i)})
            last = i == len(phases) - 1
            handoff._phase_span(db, t + timedelta(seconds=i + 1), "ok" if last else None)
    finally:
        handoff.tracer = saved
    spans = exporter.get_finished_spans()
    root = [s for s in spans if s.name == "databases.handoff"]
    assert len(root) == 1 and root[0].attributes is not None
    assert root[0].attributes["ctrlmesh.handoff.result"] == "ok"
    children = [s for s in spans if s.parent is not None]
    assert [s.name for s in children] == [f"handoff.{p.lower()}" for p in phases]
    assert {s.context.trace_id for s in spans} == {root[0].context.trace_id}
