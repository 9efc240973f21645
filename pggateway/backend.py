"""One connection from the gateway to a compute, logged in as the tenant role.

A `Backend` is an asyncio protocol with two modes. *Internal*: the gateway talks to the compute
itself (login, parameter set-up, DISCARD ALL) and reads whole messages. *Relay*: a client session
is attached, and every byte from the compute goes straight to that session's `backend_data`
with no coroutine in between — the relay is where the gateway spends its CPU.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from pggateway import protocol as pq
from pggateway.scram import ScramClient, ScramError

log = logging.getLogger("ctrlmesh.pggateway.backend")


class BackendConnectError(Exception):
    """The compute could not be reached (refused, timed out, closed during login)."""


class BackendLoginError(Exception):
    """The compute answered the login or a set-up statement with an ErrorResponse."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('C', '?')} {fields.get('M', '')}")
        self.fields = fields


@dataclass(frozen=True)
class BackendTarget:
    """Where and as whom to log in; changes when the writer moves or the password rotates."""

    host: str
    port: int
    database: str
    user: str
    password: str

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


class RelaySink(Protocol):
    """What a Backend in relay mode calls on the client session it is attached to."""

    def backend_data(self, data: bytes) -> None: ...

    def backend_lost(self) -> None: ...

    def pause_client_reading(self) -> None: ...

    def resume_client_reading(self) -> None: ...


class Backend(asyncio.Protocol):
    def __init__(self, target: BackendTarget, on_lost: Callable[[Backend], None] | None = None) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.pid = 0
        self.secret = 0
        # ParameterStatus values as the compute last reported them.
        self.reported: dict[str, str] = {}
        # Client startup parameters applied with SET (lower-cased name → value).
        self.applied: dict[str, str] = {}
        self.generation = 0
        self.session: RelaySink | None = None
        self.closed = False
        self.in_pool = False
        self._closing = False  # we closed it on purpose
        self._on_lost = on_lost
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._busy = False  # an internal exchange is running

    def __repr__(self) -> str:
        return f"Backend(pid={self.pid}, gen={self.generation})"

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            session.backend_data(data)
            return
        self._buf += data
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        elif not self._busy:
            self._unsolicited()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        session, self.session = self.session, None
        if session is not None and not self._closing:
            session.backend_lost()
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_client_reading()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_client_reading()

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def lost_unexpectedly(self) -> bool:
        return self.closed and not self._closing

    def close(self) -> None:
        """Close on purpose (Terminate, then the socket)."""
        if self.closed or self._closing:
            return
        self._closing = True
        self.session = None
        if self.transport is not None:
            try:
                self.transport.write(pq.TERMINATE_MESSAGE)
            except (RuntimeError, OSError):
                pass
            self.transport.close()

    def usable(self) -> bool:
        return not self.closed and not self._closing and not self._buf

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _unsolicited(self) -> None:
        """Messages from an idle backend: setting reports and notices are harmless; an error
        (typically FATAL before a shutdown) means this connection is finished."""
        msgs, used = pq.iter_messages(self._buf)
        for kind, start, end in msgs:
            if kind == pq.PARAMETER_STATUS:
                name, value = pq.parse_parameter_status(bytes(self._buf[start + 5 : end]))
                self.reported[name] = value
            elif kind == pq.ERROR_RESPONSE:
                fields = pq.parse_fields(bytes(self._buf[start + 5 : end]))
                log.info("idle backend pid %d got %s; closing it", self.pid, fields.get("C"))
                # Not a close of ours: it counts as lost, since the compute is usually going away.
                if self.transport is not None:
                    self.transport.close()
        del self._buf[:used]

    # -- internal mode ------------------------------------------------------------------------
    async def _message(self) -> tuple[int, bytes]:
        """The next whole message from the compute (internal mode only)."""
        while True:
            if len(self._buf) >= 5:
                kind = self._buf[0]
                length = int.from_bytes(self._buf[1:5], "big")
                if length < 4:
                    raise pq.ProtocolError("compute sent an invalid message length")
                if len(self._buf) >= length + 1:
                    body = bytes(self._buf[5 : length + 1])
                    del self._buf[: length + 1]
                    return kind, body
            if self.closed:
                raise BackendConnectError("the compute closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def login(self) -> None:
        """Startup and authentication as the tenant role, up to the first ReadyForQuery."""
        t = self.target
        self._busy = True
        try:
            self.write(pq.startup_message({"user": t.user, "database": t.database}))
            scram: ScramClient | None = None
            while True:
                kind, body = await self._message()
                if kind == pq.AUTHENTICATION:
                    code, data = pq.parse_auth(body)
                    if code == pq.AUTH_OK:
                        continue
                    if code == pq.AUTH_SASL:
                        mechanisms = [m.decode() for m in data.split(b"\x00") if m]
                        scram = ScramClient(mechanisms, t.user, t.password)
                        self.write(pq.sasl_initial_response(scram.mechanism, scram.client_first()))
                    elif code == pq.AUTH_SASL_CONTINUE and scram is not None:
                        self.write(pq.sasl_response(scram.client_final(data)))
                    elif code == pq.AUTH_SASL_FINAL and scram is not None:
                        scram.verify_server(data)
                    elif code == pq.AUTH_CLEARTEXT:
                        self.write(pq.password_message(t.password))
                    elif code == pq.AUTH_MD5:
                        inner = hashlib.md5((t.password + t.user).encode()).hexdigest()
                        self.write(
                            pq.password_message("md5" + hashlib.md5(inner.encode() + data[:4]).hexdigest())
                        )
                    else:
                        raise BackendLoginError(
                            {"C": "28000", "M": f"unsupported authentication request {code}"}
                        )
                elif kind == pq.PARAMETER_STATUS:
                    name, value = pq.parse_parameter_status(body)
                    self.reported[name] = value
                elif kind == pq.BACKEND_KEY_DATA:
                    self.pid, self.secret = pq.parse_backend_key(body)
                elif kind == pq.ERROR_RESPONSE:
                    raise BackendLoginError(pq.parse_fields(body))
                elif kind == pq.READY_FOR_QUERY:
                    return
                # NoticeResponse, NegotiateProtocolVersion: nothing to do.
        except ScramError as exc:
            raise BackendLoginError({"C": "28000", "M": f"SCRAM with the compute failed: {exc}"}) from None
        finally:
            self._busy = False

    async def simple(self, sql: str) -> dict[str, str] | None:
        """Run a simple query for the gateway's own purposes; the error fields, or None.

        The results are dropped; ParameterStatus reports are kept (they give the canonical form
        of the settings a client asked for)."""
        self._busy = True
        error: dict[str, str] | None = None
        try:
            self.write(pq.query(sql))
            while True:
                kind, body = await self._message()
                if kind == pq.PARAMETER_STATUS:
                    name, value = pq.parse_parameter_status(body)
                    self.reported[name] = value
                elif kind == pq.ERROR_RESPONSE:
                    error = pq.parse_fields(body)
                elif kind == pq.READY_FOR_QUERY:
                    if body[:1] != b"I":
                        raise BackendLoginError({"C": "25000", "M": "backend left a transaction open"})
                    return error
        finally:
            self._busy = False


async def connect(
    target: BackendTarget, connect_timeout: float, on_lost: Callable[[Backend], None] | None = None
) -> Backend:
    """Open and log in a backend; BackendConnectError / BackendLoginError on failure."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            _, backend = await loop.create_connection(
                lambda: Backend(target, on_lost), target.host, target.port
            )
            try:
                await backend.login()
            except BaseException:
                backend.close()
                raise
    except TimeoutError:
        raise BackendConnectError("timed out connecting to the compute") from None
    except OSError as exc:
        raise BackendConnectError(f"cannot connect to the compute: {exc}") from None
    return backend


CANCEL_TIMEOUT = 5.0


async def send_cancel(host: str, port: int, pid: int, secret: int) -> None:
    """Forward a CancelRequest to a compute (a separate plain connection, as PostgreSQL wants)."""
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(pq.cancel_request(pid, secret))
            await writer.drain()
            # The server closes without answering once it has read the request.
            await reader.read(1)
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("could not forward a cancel request: %s", exc)
