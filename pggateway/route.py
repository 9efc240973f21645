"""One database as the gateway sees it: its lease, its writer and its backend pool.

A route exists while clients of the database are connected (plus a short grace period, so a
connect-per-request client does not release and re-acquire the lease every time). Its lifecycle:

- the first client *attaches*: the route acquires the lease, which wakes a stopped database, and
  holds every attaching client until the lease says `ready` or CTRLMESH_PG_WAKE_TIMEOUT passes;
  concurrent first clients share one wake-up;
- while clients are attached a timer renews the lease with the number of connections; a stale
  epoch (FAILED_PRECONDITION) or an expired lease (NOT_FOUND) is re-acquired, a freeze stops new
  checkouts until it clears, then the writer is re-resolved;
- a handoff arrives first on the control stream (`apply_control`): FREEZE holds new checkouts
  at once (they wait; in-flight transactions and pinned sessions go on) and the renewals then
  report the drain (frozen, busy backends, pinned sessions) every time it changes;
  WRITER_SWITCHED routes to the new writer and releases the held checkouts to it; UNFREEZE
  (a failed handoff) releases them to the same writer. A lease answer to a request sent before
  the last pushed event is not applied (it may predate it);
- a backend the compute closed is dropped alone if the writer still answers (a client's
  `pg_terminate_backend`, an idle timeout): a bounded login probe tells that from a compute that
  went away, in which case the pool is dropped and the next checkout re-resolves the writer
  (waiting for a restart if there is one);
- when the last client leaves, the lease is released and the pool closed (idle backends must not
  keep a stopping compute busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
from opentelemetry import trace

from libs.telemetry import ATTR_DATABASE, ATTR_PG_COLD_START, ATTR_PG_OUTCOME, ATTR_TENANT
from pggateway import backend as backends
from pggateway import errors
from pggateway.backend import Backend, BackendConnectError, BackendLoginError, BackendTarget
from pggateway.controlplane import (
    WAITING_STATES,
    ControlMessage,
    ControlPlane,
    ControlPlaneError,
    Credentials,
    LeaseInfo,
    LeaseReport,
)
from pggateway.metrics import GatewayMetrics
from pggateway.pool import CheckoutTimeout, Pool, PoolClosed

log = logging.getLogger("ctrlmesh.pggateway.route")
tracer = trace.get_tracer("ctrlmesh.pggateway")

# How often a held client's wake-up asks again when the control plane answers "booting" at once.
WAKE_POLL_SECONDS = 0.015
# Between acquires that failed with a retryable status.
TRANSIENT_RETRY_SECONDS = 0.25
# While frozen, renew at least this often (the fallback when the control stream is down), and
# look at the drain state this often, reporting it at once when it changed.
FROZEN_RENEW_SECONDS = 0.1
REPORT_POLL_SECONDS = 0.005
# Between attempts to release a lease while the control plane is unreachable.
RELEASE_RETRY_SECONDS = 0.25
# Between attempts to reach a writer the control plane still calls ready after a crash.
RECONNECT_PAUSE_SECONDS = 0.05
BACKEND_CONNECT_TIMEOUT = 5.0
# The bound of the login that tells a lost backend from a lost compute.
PROBE_TIMEOUT = 3.0
# Login refusals that mean the compute itself is going or gone (class 57, operator intervention:
# shutting down, crashed and restarting, starting up); any other refusal (53300 too many
# connections, ...) comes from a writer that still answers.
_COMPUTE_GONE_CLASS = "57"


@dataclass(frozen=True)
class RouteConfig:
    holder_id: str
    pool_size: int
    wake_timeout: float
    checkout_timeout: float
    lease_ttl: float
    release_grace: float


class Route:
    def __init__(
        self,
        tenant_id: str,
        database: str,
        control_plane: ControlPlane,
        config: RouteConfig,
        metrics: GatewayMetrics,
        on_closed: Callable[[Route], None],
    ) -> None:
        self.tenant_id = tenant_id
        self.database = database
        self.clients = 0
        self.closing = False
        self.lease: LeaseInfo | None = None
        self.credentials: Credentials | None = None
        self._cp = control_plane
        self._config = config
        self._metrics = metrics
        self._on_closed = on_closed
        self._writer_suspect = False
        self._wake_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._release_handle: asyncio.TimerHandle | None = None
        self._release_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self.pool = Pool(config.pool_size, self._connect, metrics, on_lost=self._backend_lost)
        # Client sessions pinned to a backend (they cannot move in a handoff).
        self.pinned = 0
        # Loop time of the last pushed control event applied.
        self._control_mark = 0.0
        self._renew_wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"Route({self.tenant_id}/{self.database}, clients={self.clients})"

    # -- clients ------------------------------------------------------------------------------
    async def attach(self, credentials: Credentials) -> None:
        """Count a client in and hold it until the database is ready (PgError otherwise)."""
        self.clients += 1
        rotated = self.credentials is not None and self.credentials.pg_password != credentials.pg_password
        self.credentials = credentials
        if rotated and self.lease is not None:
            self._apply_lease(self.lease)  # new backends log in with the rotated password
        if self._release_handle is not None:
            self._release_handle.cancel()
            self._release_handle = None
        try:
            await self.ensure_ready(asyncio.get_running_loop().time() + self._config.wake_timeout)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        self.clients -= 1
        if self.clients == 0 and not self.closing:
            loop = asyncio.get_running_loop()
            self._release_handle = loop.call_later(self._config.release_grace, self._start_release)

    async def checkout(self, deadline: float) -> Backend:
        """A backend of the current writer, re-resolving it if it went away (PgError otherwise)."""
        loop = asyncio.get_running_loop()
        wake_deadline = loop.time() + self._config.wake_timeout
        while True:
            try:
                return await self.pool.acquire(deadline)
            except CheckoutTimeout:
                self._metrics.checkout_timeouts_total.inc()
                raise errors.checkout_timeout() from None
            except PoolClosed:
                raise errors.shutting_down() from None
            except BackendLoginError as exc:
                log.warning("the compute of %s refused the gateway's login: %s", self, exc)
                raise errors.from_compute(exc.fields) from None
            except BackendConnectError as exc:
                log.info("cannot reach the writer of %s (%s); re-resolving", self, exc)
                if loop.time() >= min(deadline, wake_deadline):
                    raise errors.compute_unreachable() from None
                self._writer_suspect = True
                await asyncio.sleep(RECONNECT_PAUSE_SECONDS)
                await self.ensure_ready(min(deadline, wake_deadline))

    # -- lease --------------------------------------------------------------------------------
    async def ensure_ready(self, deadline: float) -> None:
        lease = self.lease
        if lease is not None and lease.ready and not self._writer_suspect:
            return
        if self._wake_task is None or self._wake_task.done():
            self._wake_task = asyncio.get_running_loop().create_task(self._wake(deadline))
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                await asyncio.shield(self._wake_task)
        except TimeoutError:
            raise errors.database_starting() from None

    async def _wake(self, deadline: float) -> None:
        """Acquire (or re-acquire) the lease until the database is ready."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        cold = False
        with tracer.start_as_current_span("pggateway.wake") as span:
            span.set_attribute(ATTR_TENANT, self.tenant_id)
            span.set_attribute(ATTR_DATABASE, self.database)
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    span.set_attribute(ATTR_PG_OUTCOME, "timeout")
                    raise errors.database_starting()
                # The first ask answers at once, so a warm database costs no wait and a cold one
                # is counted; later asks may block in the control plane until the boot finishes.
                wait = remaining if cold else 0.0
                try:
                    lease = await self._cp.acquire_lease(
                        self.tenant_id, self.database, self._config.holder_id, self._config.lease_ttl, wait
                    )
                except ControlPlaneError as err:
                    transient = err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                    if transient and deadline - loop.time() > TRANSIENT_RETRY_SECONDS:
                        # Retryable: a service restarting, a database being created, a boot that
                        # failed and may succeed again. Ask again until the client's deadline.
                        log.info("acquiring the lease of %s: %s; retrying", self, err)
                        await asyncio.sleep(TRANSIENT_RETRY_SECONDS)
                        continue
                    span.set_attribute(ATTR_PG_OUTCOME, "error")
                    raise errors.from_control_plane(
                        err, user="", database=self.database, acquiring=True
                    ) from None
                self._apply_lease(lease)
                if lease.ready:
                    break
                if lease.state not in WAITING_STATES:
                    log.warning("database %s answered state %r while waking", self, lease.state)
                    span.set_attribute(ATTR_PG_OUTCOME, lease.state)
                    raise errors.database_failed() if lease.state == "error" else errors.database_busy_state()
                if not cold:
                    cold = True
                    self._metrics.cold_starts_total.inc()
                await asyncio.sleep(WAKE_POLL_SECONDS)
            self._writer_suspect = False
            span.set_attribute(ATTR_PG_COLD_START, cold)
            span.set_attribute(ATTR_PG_OUTCOME, "ready")
        if cold:
            self._metrics.wake_seconds.observe(loop.time() - started)
        if self._renew_task is None or self._renew_task.done():
            self._renew_task = loop.create_task(self._renew_loop())

    def _apply_lease(self, lease: LeaseInfo) -> None:
        if self.lease is None:
            self._metrics.leases.inc()
        self.lease = lease
        creds = self.credentials
        if lease.writer_host and lease.writer_port and creds is not None:
            self.pool.set_target(
                BackendTarget(
                    lease.writer_host,
                    lease.writer_port,
                    lease.writer_database or self.database,
                    creds.pg_user,
                    creds.pg_password,
                )
            )
        self.pool.set_frozen(lease.freeze_new_checkouts)

    def report(self) -> LeaseReport:
        return LeaseReport(
            frozen=self.pool.frozen,
            busy_backends=self.pool.busy,
            pinned_sessions=self.pinned,
            checkout_waits=self.pool.queued_total,
        )

    async def _nap(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._renew_wake.wait(), seconds)
        except TimeoutError:
            pass
        self._renew_wake.clear()

    def resync(self) -> None:
        """Renew now (the control stream reconnected: events may have been missed)."""
        self._renew_wake.set()

    async def _renew_loop(self) -> None:
        ttl = self._config.lease_ttl
        loop = asyncio.get_running_loop()
        sent: LeaseReport | None = None
        sent_at = 0.0
        while not self.closing and self.lease is not None:
            frozen = self.pool.frozen
            if frozen:
                await self._nap(REPORT_POLL_SECONDS)
                if self.report() == sent and loop.time() - sent_at < FROZEN_RENEW_SECONDS:
                    continue
            else:
                await self._nap(ttl / 3)
            lease = self.lease
            if self.closing or lease is None:
                return
            frozen = self.pool.frozen
            sent, sent_at = self.report(), loop.time()
            asked = sent_at
            try:
                fresh = await self._cp.renew_lease(lease.lease_id, lease.epoch, ttl, self.clients, sent)
            except ControlPlaneError as err:
                if err.code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    log.warning("renewing the lease of %s failed: %s", self, err)
                    continue
                log.info("lease of %s is stale (%s); re-acquiring", self, err.code.name)
                try:
                    fresh = await self._cp.acquire_lease(
                        self.tenant_id, self.database, self._config.holder_id, ttl, 0.0
                    )
                except ControlPlaneError as err2:
                    log.warning("re-acquiring the lease of %s failed: %s", self, err2)
                    continue
            if self.closing:
                return
            if asked < self._control_mark:
                continue  # a pushed event came after this was asked: the answer may predate it
            if frozen and self.pool.frozen and not fresh.freeze_new_checkouts:
                # The handoff finished (learned from the lease): re-resolve the writer before
                # checkouts resume.
                self._writer_suspect = True
                try:
                    await self.ensure_ready(loop.time() + self._config.wake_timeout)
                except errors.PgError as err3:
                    log.warning("re-resolving the writer of %s after a freeze failed: %s", self, err3)
                continue
            if fresh.freeze_new_checkouts and not self.pool.frozen:
                self._metrics.freezes_total.labels("lease").inc()
            self._apply_lease(fresh)
            if not fresh.ready and fresh.state in WAITING_STATES:
                self._writer_suspect = True

    def apply_control(self, ev: ControlMessage) -> None:
        """A control event pushed by the databases service (see the module docstring)."""
        lease = self.lease
        if lease is None or self.closing:
            return
        self._control_mark = asyncio.get_running_loop().time()
        if ev.kind == "FREEZE":
            if not self.pool.frozen:
                self._metrics.freezes_total.labels("push").inc()
            self.lease = replace(lease, freeze_new_checkouts=True)
            self.pool.set_frozen(True)
        elif ev.kind == "WRITER_SWITCHED":
            if ev.epoch < lease.epoch or not ev.writer_host:
                return
            self.pool.drop()
            self._writer_suspect = False
            self._apply_lease(
                replace(
                    lease,
                    state="ready",
                    writer_host=ev.writer_host,
                    writer_port=ev.writer_port,
                    freeze_new_checkouts=False,
                )
            )
        elif ev.kind == "UNFREEZE":
            if ev.epoch == lease.epoch:
                self.lease = replace(lease, freeze_new_checkouts=False)
                self.pool.set_frozen(False)
            elif ev.epoch > lease.epoch:
                self._writer_suspect = True  # a switch this route missed: the renewal re-resolves
        elif ev.kind == "STOPPED":
            self._writer_suspect = True
        self._renew_wake.set()  # report (or re-acquire) at once

    # -- backends -----------------------------------------------------------------------------
    async def _connect(self, target: BackendTarget, on_lost: Callable[[Backend], None]) -> Backend:
        return await backends.connect(target, BACKEND_CONNECT_TIMEOUT, on_lost)

    def _backend_lost(self, b: Backend) -> None:
        """The compute closed one of our backends: find out whether it is the compute that went."""
        if b.generation != self.pool.generation or self.closing:
            return  # an old writer's backend (already forgotten), or a closing route
        self._metrics.backends_lost_total.inc()
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(
                self._probe_writer(b.target, self.pool.generation)
            )

    async def _probe_writer(self, target: BackendTarget, generation: int) -> None:
        """Log in to the writer once, bounded: only a writer that does not answer drops the pool."""
        reason: str | None = None
        try:
            probe = await backends.connect(target, PROBE_TIMEOUT)
        except BackendConnectError as exc:
            reason = str(exc)
        except BackendLoginError as exc:
            if exc.fields.get("C", "").startswith(_COMPUTE_GONE_CLASS):
                reason = f"the compute refuses logins ({exc.fields.get('C')})"
        else:
            probe.close()
        if self.closing or generation != self.pool.generation:
            return
        if reason is None:
            log.info("a backend of %s was closed by its compute, which still answers; dropped it alone", self)
            return
        log.warning("the compute of %s is gone (%s); dropping the pool", self, reason)
        self._metrics.compute_lost_total.inc()
        self._writer_suspect = True
        self.pool.drop()

    # -- release ------------------------------------------------------------------------------
    def _start_release(self) -> None:
        self._release_handle = None
        if self.clients == 0 and not self.closing:
            self.closing = True
            self._on_closed(self)
            self._release_task = asyncio.get_running_loop().create_task(self._release())

    async def _release(self, retry: bool = True) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self._renew_task is not None:
            self._renew_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renew_task
        if self._wake_task is not None and not self._wake_task.done():
            self._wake_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, errors.PgError):
                await self._wake_task
        self.pool.close()
        lease, self.lease = self.lease, None
        if lease is None:
            return
        self._metrics.leases.dec()
        loop = asyncio.get_running_loop()
        # A lease left behind keeps its database from idling and a handoff waiting for this
        # holder's freeze until it expires: while the control plane is restarting, try again.
        give_up = loop.time() + (self._config.lease_ttl if retry else 0.0)
        while True:
            try:
                await self._cp.release_lease(lease.lease_id, lease.epoch)
                return
            except ControlPlaneError as err:
                transient = err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not transient or loop.time() >= give_up:
                    # The lease expires by itself after its TTL; nothing else to do.
                    log.warning("releasing the lease of %s failed: %s", self, err)
                    return
            await asyncio.sleep(RELEASE_RETRY_SECONDS)

    async def close(self) -> None:
        """Release now (gateway shutdown)."""
        if self._release_handle is not None:
            self._release_handle.cancel()
            self._release_handle = None
        if not self.closing:
            self.closing = True
            self._on_closed(self)
            self._release_task = asyncio.get_running_loop().create_task(self._release(retry=False))
        if self._release_task is not None:
            await self._release_task


class Router:
    """The routes by (tenant_id, database)."""

    def __init__(self, control_plane: ControlPlane, config: RouteConfig, metrics: GatewayMetrics) -> None:
        self._cp = control_plane
        self._config = config
        self._metrics = metrics
        self._routes: dict[tuple[str, str], Route] = {}

    def get(self, tenant_id: str, database: str) -> Route:
        key = (tenant_id, database)
        route = self._routes.get(key)
        if route is None or route.closing:
            route = Route(tenant_id, database, self._cp, self._config, self._metrics, self._forget)
            self._routes[key] = route
        return route

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def _forget(self, route: Route) -> None:
        key = (route.tenant_id, route.database)
        if self._routes.get(key) is route:
            del self._routes[key]

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in list(self._routes.values())), return_exceptions=True)
