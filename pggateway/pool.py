"""The backend pool of one database: at most `size` logged-in connections to its writer.

Checkout prefers an idle backend (most recently used first, the warmest), opens a new one while
under `size`, and otherwise queues the caller (first come, first served) until a backend comes
back or the deadline passes. A returned backend goes straight to the longest waiter.

`generation` is how the pool forgets a writer: `drop()` (compute lost, writer moved) closes the
idle backends and bumps it, and any backend of an older generation is closed when it comes back
instead of being reused. `frozen` (a handoff's freeze_new_checkouts) stops checkouts without
failing them: waiters keep waiting, and in-flight transactions drain normally; `busy` is what
the drain waits for, and the time from the first held checkout to the release is the freeze
window (pggateway_freeze_window_seconds).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from pggateway.backend import Backend, BackendTarget
from pggateway.metrics import GatewayMetrics

log = logging.getLogger("ctrlmesh.pggateway.pool")


class CheckoutTimeout(Exception):
    """No backend became available before the deadline."""


class PoolClosed(Exception):
    """The pool was closed (its route released the database) while a caller waited."""


Connect = Callable[[BackendTarget, Callable[[Backend], None]], Awaitable[Backend]]
# A queued checkout: called with a backend (or None: "a slot freed or the freeze lifted, try
# again"); answers whether it took it (False: it already gave up, hand it to the next one).
Waiter = Callable[[Backend | None], bool]


class Pool:
    def __init__(
        self,
        size: int,
        connect: Connect,
        metrics: GatewayMetrics,
        on_lost: Callable[[Backend], None] | None = None,
    ) -> None:
        self.size = size
        self.generation = 0
        self.frozen = False
        self.closed = False
        self.target: BackendTarget | None = None
        self._connect = connect
        self._metrics = metrics
        self._on_lost = on_lost
        self._idle: list[Backend] = []
        self._members: set[Backend] = set()
        self._connecting = 0
        self._waiters: deque[Waiter] = deque()
        # Loop time of the first checkout a freeze held (the freeze window's start), and the
        # checkouts that queued because the pool was full (the autoscaler's signal; a counter).
        self._held_since: float | None = None
        self._held = 0
        self.queued_total = 0

    @property
    def open_count(self) -> int:
        return len(self._members) + self._connecting

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> int:
        """Backends checked out (or being opened): in-flight transactions and pinned sessions."""
        return len(self._members) - len(self._idle) + self._connecting

    def _note_wait(self) -> None:
        if self.frozen:
            if self._held_since is None:
                self._held_since = asyncio.get_running_loop().time()
            self._held += 1
            self._metrics.checkouts_held.inc()
        else:
            self.queued_total += 1

    def set_target(self, target: BackendTarget) -> None:
        """Route new backends to `target`; a different writer address forgets the old one."""
        old = self.target
        self.target = target
        if old is not None and old.address != target.address:
            log.info("writer moved; dropping pooled backends")
            self.drop()

    def set_frozen(self, frozen: bool) -> None:
        if self.frozen and not frozen:
            self.frozen = False
            if self._held_since is not None:
                self._metrics.freeze_window_seconds.observe(
                    asyncio.get_running_loop().time() - self._held_since
                )
                self._held_since = None
            self._metrics.checkouts_held.dec(self._held)
            self._metrics.checkouts_held_total.inc(self._held)
            self._held = 0
            self._wake_all()
        self.frozen = frozen

    def must_wait(self) -> bool:
        """Whether a checkout that found no idle backend has to queue (full, or frozen)."""
        return self.frozen or self.open_count >= self.size or self.target is None

    def enqueue(self, waiter: Waiter) -> None:
        """Queue a checkout; the relay's waiter is called synchronously on hand-over, so a
        returned backend goes to the next client within the same callback."""
        self._note_wait()
        self._waiters.append(waiter)

    def dequeue(self, waiter: Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def acquire_nowait(self) -> Backend | None:
        """An idle backend right now, or None (the relay's hot path: no task, no await)."""
        if self.frozen or self._waiters:
            return None
        while self._idle:
            b = self._idle.pop()
            b.in_pool = False
            if b.usable() and b.generation == self.generation:
                return b
            self._forget(b)
        return None

    async def acquire(self, deadline: float) -> Backend:
        """A backend for the caller, by `deadline` (loop time); CheckoutTimeout otherwise.

        Connection errors of a new backend propagate (BackendConnectError / BackendLoginError).
        """
        loop = asyncio.get_running_loop()
        while True:
            if self.closed:
                raise PoolClosed()
            if not self.frozen:
                while self._idle:
                    b = self._idle.pop()
                    b.in_pool = False
                    if b.usable() and b.generation == self.generation:
                        return b
                    self._forget(b)
                if self.open_count < self.size and self.target is not None:
                    return await self._open(self.target)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CheckoutTimeout()
            fut: asyncio.Future[Backend | None] = loop.create_future()

            def waiter(b: Backend | None, fut: asyncio.Future[Backend | None] = fut) -> bool:
                if fut.done():
                    return False
                fut.set_result(b)
                return True

            self._note_wait()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(remaining):
                    got = await fut
            except TimeoutError:
                self._abandon(fut, waiter)
                raise CheckoutTimeout() from None
            except BaseException:
                self._abandon(fut, waiter)
                raise
            if got is None:
                continue  # a slot freed or the freeze lifted: try again
            if got.usable() and got.generation == self.generation and not self.frozen:
                return got
            self.release(got)

    async def _open(self, target: BackendTarget) -> Backend:
        self._connecting += 1
        try:
            b = await self._connect(target, self._backend_lost)
        except BaseException:
            self._connecting -= 1
            self._wake_one()
            raise
        self._connecting -= 1
        b.generation = self.generation
        self._members.add(b)
        self._metrics.server_connections.inc()
        self._metrics.server_connections_total.inc()
        if self.closed:
            self._forget(b)
            raise PoolClosed()
        return b

    def release(self, b: Backend) -> None:
        """Take a backend back (clean: idle, no transaction, nothing buffered)."""
        if self.closed or b.generation != self.generation or not b.usable():
            self._forget(b)
            return
        if not self.frozen:
            while self._waiters:
                if self._waiters.popleft()(b):
                    return
        b.in_pool = True
        self._idle.append(b)

    def discard(self, b: Backend) -> None:
        """Close a backend that is not clean (mid-transaction, unknown state)."""
        self._forget(b)

    def drop(self) -> None:
        """Forget the writer's backends: idle ones now, checked-out ones when they return."""
        self.generation += 1
        idle, self._idle = self._idle, []
        for b in idle:
            b.in_pool = False
            self._forget(b)

    def close(self) -> None:
        """Close for good; queued checkouts are woken and find the pool closed."""
        self.closed = True
        self.drop()
        self._wake_all()

    def _forget(self, b: Backend) -> None:
        if b in self._members:
            self._members.discard(b)
            self._metrics.server_connections.dec()
        if b.in_pool:
            b.in_pool = False
            try:
                self._idle.remove(b)
            except ValueError:
                pass
        b.close()
        self._wake_one()

    def _backend_lost(self, b: Backend) -> None:
        """Called by a backend whose socket closed, idle or in use."""
        unexpected = b.lost_unexpectedly
        self._forget(b)
        if unexpected and self._on_lost is not None:
            self._on_lost(b)

    def _abandon(self, fut: asyncio.Future[Backend | None], waiter: Waiter) -> None:
        """A waiter gave up (timeout, cancellation); a backend handed to it just then goes back."""
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            b = fut.result()
            if b is not None:
                self.release(b)
            else:
                self._wake_one()  # pass the freed slot on
        else:
            fut.cancel()
        self.dequeue(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            if self._waiters.popleft()(None):
                return

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter(None)
