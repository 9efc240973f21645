"""The relay of one authenticated client: transaction pooling with session pinning.

The session owns the client's transport once authentication is done. Client → backend, it frames
messages (to count sync points, drop Terminate and classify Query/Parse text); backend → client
it forwards bytes as they come and watches ReadyForQuery. A backend is checked out when the client
sends something and no backend is attached, and is returned to the pool at a ReadyForQuery that
answers every sync point the client sent, with status 'I' (no transaction), no half-sent
extended-protocol batch, and the session not pinned.

Per-client startup parameters (application_name, client_encoding, DateStyle, TimeZone, ...) are
applied to whichever backend the client gets: a backend remembers what it was SET to, and only
differences are sent, in one round trip before the client's own bytes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine
from typing import Any, Protocol

from opentelemetry.trace import Span

from libs.telemetry import ATTR_PG_OUTCOME, ATTR_PG_PIN_REASON
from pggateway import backend as backends
from pggateway import classify, errors, sqlprepare
from pggateway import protocol as pq
from pggateway.backend import Backend
from pggateway.config import GatewayConfig
from pggateway.metrics import GatewayMetrics
from pggateway.prepared import PreparedRelay, StatementRegistry, mentions_statements
from pggateway.route import Route
from pggateway.tls import TLS_RECORD_PLAINTEXT, write_records


class SessionHost(Protocol):
    """What a session needs from the server that accepted it (`GatewayServer`): its settings and
    metrics, the shared prepared statements, a place for background work, and word when the
    session ends. A Protocol, so the session does not import the server that imports it."""

    config: GatewayConfig
    metrics: GatewayMetrics
    prepared: StatementRegistry

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...

    def session_finished(self, session: ClientSession) -> None: ...


log = logging.getLogger("ctrlmesh.pggateway.session")

_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_RELEASE_AFTER_DISCARD_TIMEOUT = 5.0


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def settings_sql(want: dict[str, tuple[str, str]], applied: dict[str, str]) -> str:
    """The SET/RESET statements that turn a backend's `applied` settings into `want`."""
    stmts = [
        f"SET {quote_ident(name)} TO {quote_literal(value)}"
        for key, (name, value) in want.items()
        if applied.get(key) != value
    ]
    stmts += [f"RESET {quote_ident(key)}" for key in applied if key not in want]
    return "; ".join(stmts)


def client_settings(params: dict[str, str]) -> dict[str, tuple[str, str]]:
    """The GUCs a client asked for in its startup packet (lower-cased name → (name, value))."""
    out: dict[str, tuple[str, str]] = {}
    merged = dict(pq.parse_options(params.get("options", "")))
    for k, v in params.items():
        if k not in ("user", "database", "options", "replication") and not k.startswith("_pq_."):
            merged[k] = v
    for name, value in merged.items():
        if not _GUC_NAME.match(name):
            raise errors.PgError("42704", f'unrecognized configuration parameter "{name[:64]}"', errors.USER)
        out[name.lower()] = (name, value)
    return out


class ClientSession(asyncio.Protocol):
    def __init__(
        self,
        server: SessionHost,
        route: Route,
        transport: asyncio.Transport,
        settings: dict[str, tuple[str, str]],
        cancel_key: tuple[int, int],
        span: Span,
    ) -> None:
        self.server = server
        self.route = route
        self.transport = transport
        self.settings = settings
        self._want = {k: v for k, (_, v) in settings.items()}
        self.cancel_key = cancel_key
        self.span = span
        self.backend: Backend | None = None
        self.pin_reason: str | None = None
        self.pending = 0  # Query/Sync/FunctionCall sent and not yet answered by ReadyForQuery
        self.unsynced = False  # extended-protocol messages sent since the last Sync
        self.tx_status = b"I"
        self._inbuf = bytearray()
        self._queue: list[bytes] = []
        self._checkout_task: asyncio.Task[None] | None = None
        # A checkout queued in the pool (the relay's waiter, called on hand-over).
        self._waiting_since: float | None = None
        self._wait_timer: asyncio.TimerHandle | None = None
        self._scanner = pq.ServerStreamScanner()
        # Named statements kept by the gateway (max_prepared_statements > 0): the relay then
        # rewrites Parse/Bind/Describe/Close and follows the backend stream in the scanner's
        # place. Each queued chunk has (needs rewriting, Sync/Query/FunctionCall count) beside it.
        registry = server.prepared
        self._relay = PreparedRelay(registry) if registry.enabled else None
        self._queue_meta: list[tuple[bool, int, list[tuple[int, int, int]] | None]] = []
        self._finished = False
        self._client_paused = False  # the client's socket is full: backend reading paused
        self._client_reading_paused = False  # the backend's socket is full: client reading paused
        self._server_fatal = False  # the attached backend sent a FATAL error: it closes next

    # -- set-up -------------------------------------------------------------------------------
    async def apply_settings(self, b: Backend) -> None:
        """Bring a backend's settings to this client's; PgError if the compute refuses them."""
        if b.applied == self._want:
            return
        sql = settings_sql(self.settings, b.applied)
        try:
            fields = await b.simple(sql)
        except (backends.BackendConnectError, backends.BackendLoginError, pq.ProtocolError):
            self.route.pool.discard(b)
            raise errors.compute_lost() from None
        if fields is not None:
            # Rolled back as a whole (one implicit transaction): the backend is still clean.
            self.route.pool.release(b)
            raise errors.from_compute(fields)
        b.applied = dict(self._want)

    def start(self, leftover: bytes) -> None:
        """Take over the client's transport (after the startup exchange has been answered)."""
        self.transport.set_protocol(self)
        if leftover:
            self.data_received(leftover)

    # -- client → backend ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._finished:
            return
        buf = self._inbuf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        try:
            msgs, consumed = pq.iter_messages(view)
        except pq.ProtocolError as exc:
            self.fatal(errors.protocol_violation(str(exc)))
            return
        if not msgs:
            if not buf:
                self._inbuf = bytearray(data)
            return
        out_end = consumed
        terminate = False
        relay = self._relay
        rewrite = False
        batches = 0
        for kind, start, end in msgs:
            if kind == pq.QUERY:
                self.pending += 1
                batches += 1
                if self.pin_reason is None:
                    reason = classify.pin_reason_for_query(pq.parse_query(view[start + 5 : end]))
                    if (
                        reason == classify.PREPARE
                        and relay is not None
                        and _tracked_prepare(view[start + 5 : end])
                    ):
                        reason = None  # the relay keeps it (pggateway.sqlprepare)
                    self._maybe_pin(reason)
                if relay is not None and mentions_statements(view[start + 5 : end]):
                    rewrite = True
            elif kind == pq.SYNC:
                self.pending += 1
                batches += 1
                self.unsynced = False
            elif kind == pq.PARSE:
                self.unsynced = True
                if relay is not None:
                    rewrite = True
                if self.pin_reason is None:
                    name, sql = pq.parse_parse(view[start + 5 : end])
                    self._maybe_pin(classify.pin_reason_for_parse(name, sql, named_pins=relay is None))
            elif kind == pq.TERMINATE:
                out_end = start
                terminate = True
                break
            elif kind == pq.FUNCTION_CALL:
                self.pending += 1
                batches += 1
            elif kind in _EXTENDED:
                self.unsynced = True
                if relay is not None and kind in _NAMED:
                    rewrite = True
        if view is data:
            chunk = data if out_end == len(data) else data[:out_end]
            if consumed < len(data) and not terminate:
                self._inbuf = bytearray(data[consumed:])
        else:
            chunk = bytes(buf[:out_end])
            del buf[:consumed]
        if chunk:
            b = self.backend
            if relay is not None:
                if b is None and rewrite and len(msgs) == 1 and self._answer_idle(relay, chunk):
                    pass
                elif b is not None:
                    framing = None if terminate else msgs
                    b.write(relay.client_chunk(chunk, self.tx_status, framing) if rewrite else chunk)
                    if not rewrite:
                        relay.count_batches(batches)
                else:
                    self._queue.append(chunk)
                    self._queue_meta.append((rewrite, batches, None if terminate else msgs))
                    if self._checkout_task is None and self._waiting_since is None:
                        self._begin_checkout()
            elif b is not None:
                b.write(chunk)
            else:
                self._queue.append(chunk)
                if self._checkout_task is None and self._waiting_since is None:
                    self._begin_checkout()
        if terminate:
            self.finish()

    def _answer_idle(self, relay: PreparedRelay, chunk: bytes) -> bool:
        """A lone DEALLOCATE of the client's own statements between transactions is answered
        without a backend (psycopg sends DEALLOCATE ALL after every ROLLBACK)."""
        if (
            chunk[0] != pq.QUERY
            or self.pending != 1
            or self.unsynced
            or self.tx_status != b"I"
            or self._queue
            or self._checkout_task is not None
            or self._waiting_since is not None
        ):
            return False
        reply = relay.deallocate_idle(chunk[5:])
        if reply is None:
            return False
        self.pending = 0
        write_records(self.transport, reply)
        return True

    def _maybe_pin(self, reason: str | None) -> None:
        if reason is None:
            return
        self.pin_reason = reason
        self.route.pinned += 1
        self.server.metrics.pinned_sessions.inc()
        self.server.metrics.pinned_total.labels(reason).inc()
        self.span.set_attribute(ATTR_PG_PIN_REASON, reason)

    # -- checkout -----------------------------------------------------------------------------
    # Three ways to get a backend, cheapest first: an idle one right now (no task, no await);
    # a place in the pool's queue, handed a backend synchronously by whoever returns one; and a
    # task, for what needs awaiting (opening a connection, re-resolving the writer, a SET).

    def _begin_checkout(self) -> None:
        pool = self.route.pool
        b = pool.acquire_nowait()
        if b is not None:
            if b.applied == self._want:
                self.server.metrics.hot.checkout(0.0)
                self._attach_and_flush(b)
            else:
                self._start_checkout_task(b)
            return
        if pool.must_wait() and not pool.closed:
            loop = asyncio.get_running_loop()
            self._waiting_since = now = loop.time()
            self._wait_timer = loop.call_at(now + self.server.config.checkout_timeout, self._wait_expired)
            pool.enqueue(self._handoff)
            return
        self._start_checkout_task(None)

    def _handoff(self, b: Backend | None) -> bool:
        """The pool hands this queued client a backend (or None: try again)."""
        if self._finished or self._waiting_since is None:
            return False
        waited = asyncio.get_running_loop().time() - self._waiting_since
        # The pool has already taken this waiter off its queue: no search of the queue for it.
        self._waiting_since = None
        self._stop_waiting()
        if b is not None and b.applied == self._want:
            self.server.metrics.hot.checkout(waited)
            self._attach_and_flush(b)
        else:
            self._start_checkout_task(b)
        return True

    def _wait_expired(self) -> None:
        self._wait_timer = None
        if self._waiting_since is None:
            return
        self._stop_waiting()
        self.server.metrics.checkout_timeouts_total.inc()
        self.fatal(errors.checkout_timeout())

    def _stop_waiting(self) -> None:
        if self._waiting_since is not None:
            self._waiting_since = None
            self.route.pool.dequeue(self._handoff)
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None

    def _start_checkout_task(self, given: Backend | None) -> None:
        self._checkout_task = asyncio.get_running_loop().create_task(self._checkout(given))

    def _attach_and_flush(self, b: Backend) -> None:
        self._attach(b)
        relay = self._relay
        if relay is not None:
            status = self.tx_status
            parts = []
            for chunk, (rewrite, batches, framing) in zip(self._queue, self._queue_meta, strict=True):
                if rewrite:
                    parts.append(relay.client_chunk(chunk, status, framing))
                else:
                    parts.append(chunk)
                    relay.count_batches(batches)
            self._queue_meta.clear()
            self._queue[:] = parts
        data = b"".join(self._queue) if len(self._queue) != 1 else self._queue[0]
        self._queue.clear()
        b.write(data)

    async def _checkout(self, given: Backend | None = None) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            b = (
                given
                if given is not None
                else await self.route.checkout(started + self.server.config.checkout_timeout)
            )
            try:
                await self.apply_settings(b)
            except errors.PgError:
                raise
            except BaseException:
                self.route.pool.discard(b)
                raise
        except errors.PgError as err:
            self._checkout_task = None
            self.fatal(err)
            return
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("checkout failed")
            self._checkout_task = None
            self.fatal(errors.internal())
            return
        self._checkout_task = None
        self.server.metrics.hot.checkout(loop.time() - started)
        if self._finished:
            self.route.pool.release(b)
            return
        self._attach_and_flush(b)

    def _attach(self, b: Backend) -> None:
        self.backend = b
        b.session = self
        scanner = self._scanner
        if not scanner.at_boundary:
            scanner.reset()
        scanner.others.clear()
        self._server_fatal = False
        if self._relay is not None:
            self._relay.attach(b)
        if self._client_paused and b.transport is not None:
            b.transport.pause_reading()

    def _detach(self) -> Backend | None:
        b, self.backend = self.backend, None
        if b is None:
            return None
        b.session = None
        if self._client_paused and b.transport is not None and not b.closed:
            b.transport.resume_reading()
        if self._client_reading_paused:
            self._client_reading_paused = False
            self.transport.resume_reading()
        return b

    # -- backend → client ---------------------------------------------------------------------
    def backend_data(self, data: bytes) -> None:
        # The relay's per-read path: no allocation, no logging, one write to the client. With
        # the gateway keeping prepared statements, the relay's follower reads the stream in the
        # scanner's place: it must see every response to keep its queue in step, and it drops
        # or rewrites the replies to what it injected.
        relay = self._relay
        stream: pq.ServerStreamScanner | PreparedRelay
        try:
            if relay is None:
                stream = self._scanner
                ready = stream.feed(data)
            else:
                stream = relay
                data, ready = relay.feed(data)
        except pq.ProtocolError:
            log.error("the compute broke the protocol; closing the session")
            b = self._detach()
            if b is not None:
                self.route.pool.discard(b)
            self.fatal(errors.compute_lost())
            return
        if len(data) <= TLS_RECORD_PLAINTEXT:
            if data:
                self.transport.write(data)
        else:
            write_records(self.transport, data)
        if stream.others:
            self._server_messages(stream.others)
        if not ready:
            return
        self.pending -= ready
        self.tx_status = stream.status
        if (
            self.pending <= 0
            and self.tx_status == b"I"
            and not self.unsynced
            and self.pin_reason is None
            and stream.at_boundary
        ):
            self.pending = 0
            b = self._detach()
            if b is not None:
                self.route.pool.release(b)

    def _at_boundary(self) -> bool:
        return self._scanner.at_boundary if self._relay is None else self._relay.at_boundary

    def _server_messages(self, messages: list[tuple[int, bytes]]) -> None:
        """ParameterStatus and ErrorResponse from the attached backend (rare: kept off the path)."""
        b = self.backend
        for kind, body in messages:
            if kind == pq.ERROR_RESPONSE:
                if pq.is_fatal(body):
                    self._server_fatal = True
            elif b is not None:
                name, value = pq.parse_parameter_status(body)
                b.reported[name] = value
        messages.clear()

    def backend_lost(self) -> None:
        """The compute closed our backend mid-use (crash, stop, terminate)."""
        self.backend = None
        if self._server_fatal:
            # PostgreSQL said why (FATAL 57P01 after a pg_terminate_backend, ...) and the client
            # has it: it ends the way it would directly, with no second error of ours.
            self.server.metrics.connection_errors_total.labels(errors.COMPUTE).inc()
            self.finish()
            return
        self.fatal(errors.compute_lost())

    # -- flow control -------------------------------------------------------------------------
    def pause_writing(self) -> None:
        self._client_paused = True
        b = self.backend
        if b is not None and b.transport is not None:
            b.transport.pause_reading()

    def resume_writing(self) -> None:
        self._client_paused = False
        b = self.backend
        if b is not None and b.transport is not None and not b.closed:
            b.transport.resume_reading()

    def pause_client_reading(self) -> None:
        self._client_reading_paused = True
        self.transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self._client_reading_paused:
            self._client_reading_paused = False
            self.transport.resume_reading()

    # -- the end ------------------------------------------------------------------------------
    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish()

    def fatal(self, err: errors.PgError) -> None:
        """Send a FATAL error and close (the one way a session fails)."""
        if self._finished:
            return
        self.server.metrics.connection_errors_total.labels(err.kind).inc()
        self.span.set_attribute(ATTR_PG_OUTCOME, err.sqlstate)
        try:
            self.transport.write(err.to_wire())
        except (RuntimeError, OSError):
            pass
        self.finish()

    def finish(self) -> None:
        """Give back or close the backend, stop counting the client, close its transport."""
        if self._finished:
            return
        self._finished = True
        if self._checkout_task is not None:
            self._checkout_task.cancel()
            self._checkout_task = None
        self._stop_waiting()
        clean = self.pending <= 0 and self.tx_status == b"I" and not self.unsynced and self._at_boundary()
        b = self._detach()
        if b is not None and not b.closed:
            if not clean:
                if self.pending > 0 and b.pid:
                    # The client left mid-query: stop the query, not just the connection (the
                    # compute would only notice the closed socket when it next writes).
                    self.server.spawn(backends.send_cancel(b.target.host, b.target.port, b.pid, b.secret))
                self.route.pool.discard(b)
            elif self.pin_reason is None:
                self.route.pool.release(b)
            else:
                self.server.spawn(self._reset_and_release(b))
        if self.pin_reason is not None:
            self.route.pinned -= 1
            self.server.metrics.pinned_sessions.dec()
        self.server.session_finished(self)
        self.route.detach()
        self.span.end()
        self.transport.close()

    async def _reset_and_release(self, b: Backend) -> None:
        """A pinned session's backend goes back to the pool only after DISCARD ALL."""
        try:
            async with asyncio.timeout(_RELEASE_AFTER_DISCARD_TIMEOUT):
                fields = await b.simple("DISCARD ALL")
        except (TimeoutError, backends.BackendConnectError, backends.BackendLoginError, pq.ProtocolError):
            fields = {"C": "?"}
        if fields is not None:
            self.route.pool.discard(b)
            return
        b.applied = {}
        self.server.prepared.forget(b)
        self.route.pool.release(b)

    def cancel_target(self) -> Backend | None:
        """The backend a CancelRequest of this client should reach (None when idle)."""
        return self.backend


def _tracked_prepare(payload: bytes | bytearray | memoryview) -> bool:
    """A Query that is one PREPARE the relay can read with certainty (it does not pin)."""
    return isinstance(sqlprepare.read(payload), sqlprepare.Prepare)


_EXTENDED = frozenset((pq.BIND, pq.EXECUTE, pq.DESCRIBE, pq.CLOSE, pq.FLUSH))
# Extended-protocol messages that may name a statement (the relay rewrites them).
_NAMED = frozenset((pq.BIND, pq.DESCRIBE, pq.CLOSE))
