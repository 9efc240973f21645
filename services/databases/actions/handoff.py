"""A writer profile handoff (SPG99 §6.2), one phase per step, persisted over `scale_state`:

    STEADY ─▶ PREPARING ─▶ FREEZING ─▶ DRAINING ─▶ STOPPING_OLD ─▶ STARTING_NEW ─▶ SWITCHING ─▶ COOLDOWN ─▶ STEADY
                  │            │           │             │               │
                  └────────────┴───────────┴─────────────┴───────────────┴──▶ FAILED (scale_failure_reason)

- PREPARING: the candidate (profile, worker id, term = lease_control_epoch + 1) is recorded by
  RequestHandoff; here its cgroup is made and the old writer runs a CHECKPOINT, so its shutdown
  checkpoint is short.
- FREEZING: `freeze_new_checkouts` is committed and pushed to the gateways (WatchControl); the
  phase ends when every live lease of the database has reported `frozen` (its gateway holds new
  checkouts: they wait, they do not fail).
- DRAINING: until no gateway reports a checked-out backend (in-flight transactions finish) and
  no pinned session (SET, LISTEN, temp tables, named statements by SQL: they cannot move). At the
  deadline: FAILED `pinned_sessions` (or `drain_timeout` for a long transaction), unfrozen, the
  old writer serving on; no session is ever killed.
- STOPPING_OLD: a fast shutdown of the old writer (its WAL is flushed: nothing acknowledged is
  lost); its compute run (CU·h) closes.
- STARTING_NEW: the new generation on the same data directory with the new profile, at most
  `handoff_start_timeout`; a candidate that does not start is stopped, the old profile is started
  again (a new generation too) and the handoff is FAILED `candidate_failed`.
- SWITCHING: the catalog points at the new writer (worker, address, current_profile, and
  lease_control_epoch = the term, so no lease of the old generation is used again); the gateways
  are told WRITER_SWITCHED and release their held checkouts to it. Then COOLDOWN:
  `autoscale_cooldown_until`, freeze off; the autoscaler's pass returns it to STEADY.

Resumption: every phase starts from the row, so a databases service killed in any phase redoes
that phase's step: the stop is idempotent, the start adopts a server already running on the data
directory, and PostgreSQL's postmaster.pid lock makes two writers on one data directory
impossible (the new one is only started once the old one is stopped). A SIGTERM'd service stops
its computes and records the handoff FAILED `interrupted` (lifecycle.shutdown).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span
from prometheus_client import Counter, Histogram

from libs.telemetry import ATTR_HANDOFF_FROM, ATTR_HANDOFF_RESULT, ATTR_HANDOFF_TERM, ATTR_HANDOFF_TO
from libs.timeutil import now
from services.databases import control, events
from services.databases import repository as repo
from services.databases.actions.common import STOPPED_WRITER, spec_of
from services.databases.compute.base import ComputeSpec, Endpoint
from services.databases.compute.profiles import profile
from services.databases.state import ScaleState, State, can_scale

if TYPE_CHECKING:
    from services.databases.lifecycle import Lifecycle
    from services.databases.repository import Db

log = logging.getLogger("ctrlmesh.databases.handoff")
tracer = trace.get_tracer("ctrlmesh.databases")

HANDOFFS = Counter("ctrlmesh_handoffs_total", "Writer profile handoffs by result", ["result"])
PHASE_SECONDS = Histogram(
    "ctrlmesh_handoff_phase_seconds",
    "Time spent in each handoff phase",
    ["phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# How often a waiting phase looks again when no gateway report woke it.
POLL_SECONDS = 0.05

# Failure reasons (scale_failure_reason).
PINNED_SESSIONS = "pinned_sessions"
DRAIN_TIMEOUT = "drain_timeout"
FREEZE_TIMEOUT = "freeze_timeout"
CANDIDATE_FAILED = "candidate_failed"
ROLLBACK_FAILED = "rollback_failed"
STOP_FAILED = "stop_failed"
INTERRUPTED = "interrupted"
REASONS = (PINNED_SESSIONS, DRAIN_TIMEOUT, FREEZE_TIMEOUT, CANDIDATE_FAILED, ROLLBACK_FAILED, STOP_FAILED)

# A handoff's candidate fields once it is over.
NO_CANDIDATE: dict[str, Any] = {
    "candidate_profile": None,
    "candidate_worker_id": None,
    "candidate_writer_term": None,
}


@dataclass(frozen=True)
class HandoffConfig:
    freeze_timeout: timedelta = timedelta(seconds=5)
    drain_timeout: timedelta = timedelta(seconds=10)
    start_timeout: timedelta = timedelta(seconds=30)
    cooldown: timedelta = timedelta(seconds=300)
    # PREPARING's own bound (making a cgroup, a CHECKPOINT).
    prepare_timeout: timedelta = timedelta(seconds=30)


def candidate_spec(db: Db) -> ComputeSpec:
    return replace(spec_of(db), generation=int(db.candidate_writer_term or db.lease_control_epoch + 1))


def candidate_worker_id(db: Db, term: int) -> str:
    """The worker id the candidate generation will have (the local driver's naming)."""
    return f"local-{db.id[:8]}-g{term}"


# -- traces: one per handoff, a span per phase (per process: a restart begins a new root) ----------

_roots: dict[tuple[str, int], Span] = {}


def _root(db: Db) -> Span:
    key = (db.id, int(db.candidate_writer_term or 0))
    span = _roots.get(key)
    if span is None:
        start = db.scale_phase_started_at or now()
        span = tracer.start_span("databases.handoff", start_time=int(start.timestamp() * 1e9))
        span.set_attribute(ATTR_HANDOFF_FROM, db.current_profile)
        span.set_attribute(ATTR_HANDOFF_TO, db.candidate_profile or db.target_profile)
        span.set_attribute(ATTR_HANDOFF_TERM, key[1])
        _roots[key] = span
    return span


def _phase_span(db: Db, ended: datetime, result: str | None = None) -> None:
    root = _root(db)
    started = db.scale_phase_started_at or ended
    span = tracer.start_span(
        f"handoff.{db.scale_state.lower()}",
        context=trace.set_span_in_context(root),
        start_time=int(started.timestamp() * 1e9),
    )
    span.end(end_time=int(ended.timestamp() * 1e9))
    PHASE_SECONDS.labels(db.scale_state).observe(max(0.0, (ended - started).total_seconds()))
    if result is not None:
        root.set_attribute(ATTR_HANDOFF_RESULT, result)
        root.end(end_time=int(ended.timestamp() * 1e9))
        _roots.pop((db.id, int(db.candidate_writer_term or 0)), None)


# -- persistence -------------------------------------------------------------------------------


async def scale_transition(
    lc: Lifecycle,
    s: Any,
    db: Db,
    to: ScaleState,
    values: dict[str, Any] | None = None,
    deadline: timedelta | None = None,
    *,
    result: str | None = None,
    **extra: Any,
) -> Db:
    """Persist the next phase (its start and deadline) with `database.scale_state_changed`."""
    if not can_scale(db.scale_state, to):
        raise RuntimeError(f"database {db.id}: no handoff transition {db.scale_state} → {to}")
    t = now()
    row = await repo.update_database(
        s,
        db.tenant_id,
        db.id,
        {
            "scale_state": to.value,
            "scale_phase_started_at": t,
            "scale_phase_deadline_at": t + deadline if deadline is not None else None,
            "updated_at": t,
            **(values or {}),
        },
    )
    assert row is not None
    await events.publish(
        lc.outbox, s, events.SCALE_STATE_CHANGED, row, previous_scale_state=db.scale_state, **extra
    )
    _phase_span(db, t, result)
    return row


async def _locked(lc: Lifecycle, s: Any, db: Db) -> Db | None:
    """The row, locked, if it is still `ready` in this phase of this handoff."""
    cur = await lc.locked(s, db, State.READY)
    if (
        cur is None
        or cur.scale_state != db.scale_state
        or cur.candidate_writer_term != db.candidate_writer_term
    ):
        return None
    return cur


def _event(kind: str, db: Db) -> control.ControlEvent:
    return control.ControlEvent(
        kind=kind,
        db_id=db.id,
        tenant_id=db.tenant_id,
        name=db.name,
        epoch=db.lease_control_epoch,
        writer_host=db.writer_host,
        writer_port=db.writer_port,
    )


def _last_line(err: BaseException) -> str:
    """A driver error's last line (its first lines are a server log tail, kept in last_error)."""
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__


def _past(deadline: datetime | None) -> bool:
    return deadline is not None and now() >= deadline


def _remaining(deadline: datetime | None, default: timedelta) -> float:
    if deadline is None:
        return default.total_seconds()
    return max(0.0, (deadline - now()).total_seconds())


# -- the phases --------------------------------------------------------------------------------


async def handoff(lc: Lifecycle, db: Db) -> bool:
    phase = ScaleState(db.scale_state)
    return await _PHASES[phase](lc, db)


async def _preparing(lc: Lifecycle, db: Db) -> bool:
    assert db.candidate_profile is not None
    try:
        async with asyncio.timeout(_remaining(db.scale_phase_deadline_at, lc.handoff.prepare_timeout)):
            await lc.driver.prepare_candidate(candidate_spec(db), profile(db.candidate_profile))
    except Exception as err:  # the candidate cannot even be made: the old writer serves on
        return await fail(lc, db, CANDIDATE_FAILED, err)
    try:
        async with asyncio.timeout(_remaining(db.scale_phase_deadline_at, lc.handoff.prepare_timeout)):
            await lc.driver.checkpoint(spec_of(db))
    except Exception as err:  # only makes the shutdown longer
        log.warning("CHECKPOINT before the handoff of %s failed: %s", db.id, err)
    async with lc.db.session() as s:
        cur = await _locked(lc, s, db)
        if cur is None:
            return True
        await repo.reset_drain_reports(s, cur.id)
        row = await scale_transition(
            lc, s, cur, ScaleState.FREEZING, {"freeze_new_checkouts": True}, lc.handoff.freeze_timeout
        )
    lc.bus.publish(_event(control.FREEZE, row))
    await lc.committed(db.id)
    # While the gateways acknowledge and the in-flight transactions finish, flush what was
    # written since the CHECKPOINT above, so the old writer's shutdown checkpoint (inside the
    # freeze window) has less left to write.
    lc.background(_quiet_checkpoint(lc, row), f"checkpoint of {db.id} at its freeze")
    return True


async def _quiet_checkpoint(lc: Lifecycle, db: Db) -> None:
    try:
        await lc.driver.checkpoint(spec_of(db))
    except Exception as err:  # the stop may have overtaken it: nothing lost but time
        log.debug("CHECKPOINT at the freeze of %s: %s", db.id, err)


async def _report(lc: Lifecycle, db: Db, done: Any) -> repo.DrainReport:
    """The gateways' drain report, waited on (woken by each renewal) until `done(report)` or the
    phase's deadline, for at most one second (the drive then re-reads the row)."""
    until = min(db.scale_phase_deadline_at or now(), now() + timedelta(seconds=1))
    while True:
        async with lc.db.session() as s:
            report = await repo.drain_report(s, db, now())
        if done(report) or now() >= until:
            return report
        await lc.wait_change(db.id, POLL_SECONDS)


async def _freezing(lc: Lifecycle, db: Db) -> bool:
    report = await _report(lc, db, lambda r: r.holders == r.frozen)
    if report.holders == report.frozen:
        async with lc.db.session() as s:
            cur = await _locked(lc, s, db)
            if cur is not None:
                await scale_transition(
                    lc, s, cur, ScaleState.DRAINING, deadline=lc.handoff.drain_timeout, holders=report.holders
                )
        await lc.committed(db.id)
        return True
    if _past(db.scale_phase_deadline_at):
        return await fail(
            lc,
            db,
            FREEZE_TIMEOUT,
            RuntimeError(f"{report.holders - report.frozen} gateway(s) did not freeze"),
        )
    await lc.wait_change(db.id, POLL_SECONDS)
    return True


def _drained(r: repo.DrainReport) -> bool:
    return r.holders == r.frozen and r.busy == 0 and r.pinned == 0


async def _draining(lc: Lifecycle, db: Db) -> bool:
    report = await _report(lc, db, _drained)
    if _drained(report):
        async with lc.db.session() as s:
            cur = await _locked(lc, s, db)
            if cur is not None:
                await scale_transition(lc, s, cur, ScaleState.STOPPING_OLD, deadline=lc.handoff.start_timeout)
        await lc.committed(db.id)
        return True
    if _past(db.scale_phase_deadline_at):
        reason = PINNED_SESSIONS if report.pinned else DRAIN_TIMEOUT
        return await fail(
            lc,
            db,
            reason,
            RuntimeError(
                f"{report.pinned} pinned session(s), {report.busy} busy backend(s) at the drain deadline"
            ),
        )
    await lc.wait_change(db.id, POLL_SECONDS)
    return True


async def _stopping_old(lc: Lifecycle, db: Db) -> bool:
    try:
        await lc.driver.stop(spec_of(db))
    except Exception as err:
        # Whether it still runs is unknown: stay frozen and let the next pass stop it again,
        # unless the phase is over (then the writer that may still run is kept).
        if _past(db.scale_phase_deadline_at):
            return await fail(lc, db, STOP_FAILED, err)
        log.warning("stopping the old writer of %s failed (%s); retrying", db.id, err)
        await asyncio.sleep(0.5)
        return True
    t = now()
    async with lc.db.session() as s:
        cur = await _locked(lc, s, db)
        if cur is None:
            return True
        await repo.close_runs(s, cur.id, t)
        await scale_transition(lc, s, cur, ScaleState.STARTING_NEW, deadline=lc.handoff.start_timeout)
    await lc.committed(db.id)
    return True


async def _start(lc: Lifecycle, db: Db, spec: ComputeSpec, profile_name: str, budget: float) -> Endpoint:
    async with asyncio.timeout(budget):
        endpoint, verifier = await asyncio.gather(
            lc.driver.start(spec, profile(profile_name)), lc.accounts.role_verifier(db.pg_user)
        )
        if not await lc.driver.role_verifier_applied(spec, verifier):
            await lc.driver.set_role_verifier(spec, verifier)
    return endpoint


async def _starting_new(lc: Lifecycle, db: Db) -> bool:
    assert db.candidate_profile is not None and db.candidate_writer_term is not None
    spec = candidate_spec(db)
    try:
        endpoint = await _start(
            lc,
            db,
            spec,
            db.candidate_profile,
            _remaining(db.scale_phase_deadline_at, lc.handoff.start_timeout),
        )
    except Exception as err:  # not started in time, or not at all: the old profile again
        log.error("the %s candidate of %s did not start: %s", db.candidate_profile, db.id, _last_line(err))
        return await _rollback(lc, db, err)
    async with lc.db.session() as s:
        cur = await _locked(lc, s, db)
        if cur is None:
            return True
        prof = profile(db.candidate_profile)
        row = await scale_transition(
            lc,
            s,
            cur,
            ScaleState.SWITCHING,
            {
                # The new writer is in the catalog: checkouts go to it (released by the gateways
                # on WRITER_SWITCHED, or by the lease that now names it).
                "freeze_new_checkouts": False,
                "current_scale": 1,
                "current_profile": prof.name,
                "worker_id": endpoint.worker_id,
                "candidate_worker_id": endpoint.worker_id,
                "writer_host": endpoint.host,
                "writer_port": endpoint.port,
                "lease_control_epoch": db.candidate_writer_term,
            },
        )
        # Billing: the new generation from the moment it was being started.
        await repo.open_run(
            s,
            cur,
            worker_id=endpoint.worker_id,
            profile=prof.name,
            cu=prof.cu,
            started_at=db.scale_phase_started_at or now(),
        )
    lc.bus.publish(_event(control.WRITER_SWITCHED, row))
    await lc.committed(db.id)
    return True


async def _switching(lc: Lifecycle, db: Db) -> bool:
    async with lc.db.session() as s:
        cur = await _locked(lc, s, db)
        if cur is None:
            return True
        until = now() + lc.handoff.cooldown
        row = await scale_transition(
            lc,
            s,
            cur,
            ScaleState.COOLDOWN,
            {"freeze_new_checkouts": False, "autoscale_cooldown_until": until, **NO_CANDIDATE},
            lc.handoff.cooldown,
            result="ok",
        )
    await lc.committed(db.id)
    # Gateways that routed on WRITER_SWITCHED are released already; this one is for any that
    # learned the switch from their lease.
    lc.bus.publish(_event(control.UNFREEZE, row))
    HANDOFFS.labels("ok").inc()
    log.info("database %s handed off to %s (term %d)", db.id, row.current_profile, row.lease_control_epoch)
    return False


async def fail(lc: Lifecycle, db: Db, reason: str, err: BaseException, **values: Any) -> bool:
    """FAILED with `reason`, unfrozen, the old writer serving on (cooldown applies)."""
    async with lc.db.session() as s:
        cur = await _locked(lc, s, db)
        if cur is None:
            return True
        row = await scale_transition(
            lc,
            s,
            cur,
            ScaleState.FAILED,
            {
                "freeze_new_checkouts": False,
                "target_profile": values.pop("current_profile", cur.current_profile),
                "scale_failure_reason": reason,
                "autoscale_cooldown_until": now() + lc.handoff.cooldown,
                "last_error": str(err)[:2000],
                **NO_CANDIDATE,
                **values,
            },
            result=reason,
        )
    await lc.committed(db.id)
    kind = control.WRITER_SWITCHED if row.lease_control_epoch != db.lease_control_epoch else control.UNFREEZE
    lc.bus.publish(_event(kind, row))
    HANDOFFS.labels(reason).inc()
    log.warning("handoff of database %s failed (%s): %s", db.id, reason, _last_line(err))
    return False


async def _rollback(lc: Lifecycle, db: Db, err: BaseException) -> bool:
    """The candidate did not start: stop whatever it left, start the old profile again."""
    spec = candidate_spec(db)
    try:
        await lc.driver.stop(spec)
    except Exception:
        log.warning("could not stop the failed candidate of %s", db.id, exc_info=True)
    try:
        endpoint = await _start(lc, db, spec, db.current_profile, lc.handoff.start_timeout.total_seconds())
    except Exception as err2:
        log.error("could not start %s again with its old profile: %s", db.id, err2)
        async with lc.db.session() as s:
            cur = await _locked(lc, s, db)
            if cur is not None:
                row = await scale_transition(
                    lc,
                    s,
                    cur,
                    ScaleState.FAILED,
                    {
                        "freeze_new_checkouts": False,
                        "target_profile": cur.current_profile,
                        "scale_failure_reason": ROLLBACK_FAILED,
                        "last_error": f"{err}; then: {err2}"[:2000],
                        **NO_CANDIDATE,
                    },
                    result=ROLLBACK_FAILED,
                )
                await lc.transition(s, row, State.ERROR, {**STOPPED_WRITER, "target_scale": 0})
        await lc.committed(db.id)
        lc.bus.publish(_event(control.STOPPED, db))
        HANDOFFS.labels(ROLLBACK_FAILED).inc()
        return False
    prof = profile(db.current_profile)
    values = {
        "current_scale": 1,
        "worker_id": endpoint.worker_id,
        "writer_host": endpoint.host,
        "writer_port": endpoint.port,
        "lease_control_epoch": spec.generation,
    }
    async with lc.db.session() as s:
        cur = await _locked(lc, s, db)
        if cur is not None:
            await repo.open_run(
                s, cur, worker_id=endpoint.worker_id, profile=prof.name, cu=prof.cu, started_at=now()
            )
    return await fail(lc, db, CANDIDATE_FAILED, err, **values)


_PHASES = {
    ScaleState.PREPARING: _preparing,
    ScaleState.FREEZING: _freezing,
    ScaleState.DRAINING: _draining,
    ScaleState.STOPPING_OLD: _stopping_old,
    ScaleState.STARTING_NEW: _starting_new,
    ScaleState.SWITCHING: _switching,
}
