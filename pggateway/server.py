"""The listener: negotiation, TLS, authentication and routing of each new connection.

A connection goes through, in order: the untyped startup packets (SSLRequest → TLS;
GSSENCRequest → 'N'; CancelRequest → forwarded, plain or inside TLS, as clients send both; a
plaintext StartupMessage → 28000 "SSL required"), SCRAM-SHA-256[-PLUS] against the tenant's
stored verifier, the tenant's status, the wake-up of its database, a first backend checkout to
apply the client's settings and learn the server's parameters, and then the hand-over of the
transport to a `ClientSession`. Every failure leaves through `pggateway.errors`.

The Unix socket (`libs/pg_socket.py`) differs in one step only, as PostgreSQL's own does:
SSLRequest is answered 'N' and a plaintext StartupMessage is accepted (there is no network to
protect; the socket file's permissions are the boundary), so SCRAM-SHA-256 is offered without
the -PLUS variant (no TLS channel to bind). Authentication, the tenant's status, wake-up,
pooling and cancels are the same code as over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from libs import pg_socket
from libs.telemetry import ATTR_DATABASE, ATTR_PG_OUTCOME, ATTR_PG_USER, ATTR_TENANT
from pggateway import errors, keys
from pggateway import protocol as pq
from pggateway.backend import CANCEL_TIMEOUT, send_cancel
from pggateway.config import GatewayConfig
from pggateway.control import ControlFollower
from pggateway.controlplane import ControlPlane, ControlPlaneError, CredentialCache, Credentials
from pggateway.metrics import GatewayMetrics
from pggateway.prepared import StatementRegistry
from pggateway.route import Router
from pggateway.scram import SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramError, ScramServer, Verifier
from pggateway.session import ClientSession, client_settings
from pggateway.tls import TlsMaterial, channel_binding_data, server_context, write_records

log = logging.getLogger("ctrlmesh.pggateway.server")
tracer = trace.get_tracer("ctrlmesh.pggateway")

# The whole negotiation + SCRAM exchange must fit in this (PostgreSQL's authentication_timeout
# is 60 s; a client that stalls here holds only a socket, but we still bound it).
HANDSHAKE_TIMEOUT = 30.0
TLS_HANDSHAKE_TIMEOUT = 10.0
# A cancel passed between workers on this host.
PEER_TIMEOUT = 2.0


class _Disconnected(Exception):
    """The client closed the connection during the startup exchange."""


class _StartupConnection(asyncio.Protocol):
    """The client's transport during the startup exchange: buffered, read by a coroutine."""

    def __init__(self, server: GatewayServer, *, local: bool = False) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.tls = False
        # Accepted on the Unix socket: no TLS, by design (see the module's docstring).
        self.local = local
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.server.spawn(self.server.handle(self))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            if self.closed:
                raise _Disconnected()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read_startup(self) -> pq.StartupPacket:
        await self._fill(4)
        length = pq.startup_length(bytes(self._buf[:4]))
        await self._fill(length)
        packet = bytes(self._buf[:length])
        del self._buf[:length]
        return pq.parse_startup(packet)

    async def read_message(self, expect: int, limit: int = 65536) -> bytes:
        await self._fill(5)
        kind = self._buf[0]
        length = int.from_bytes(self._buf[1:5], "big")
        if kind != expect:
            raise pq.ProtocolError(f"expected message {chr(expect)!r}, got {chr(kind)!r}")
        if length < 4 or length > limit:
            raise pq.ProtocolError("invalid message length")
        await self._fill(length + 1)
        body = bytes(self._buf[5 : length + 1])
        del self._buf[: length + 1]
        return body

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            write_records(self.transport, data)

    def leftover(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def start_tls(self, ctx: ssl.SSLContext) -> None:
        if self._buf:
            # Bytes after SSLRequest before TLS: a man-in-the-middle injection (CVE-2021-23222).
            raise pq.ProtocolError("unencrypted data after SSLRequest")
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            self.transport, self, ctx, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT
        )
        if new is None:
            raise _Disconnected()
        self.transport = cast(asyncio.Transport, new)
        self.tls = True


class GatewayServer:
    def __init__(
        self,
        config: GatewayConfig,
        control_plane: ControlPlane,
        tls: TlsMaterial,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.tls = tls
        self._ssl = server_context(tls)
        self._channel_binding = channel_binding_data(tls.cert_path)
        self._credentials = CredentialCache(control_plane, config.credentials_ttl)
        self.router = Router(control_plane, config.route_config(), self.metrics)
        self._control_plane = control_plane
        self.prepared = StatementRegistry(config.max_prepared_statements)
        self.metrics.registry.register(self.prepared)
        self._decoy_secret = secrets.token_bytes(32)
        self._server: asyncio.Server | None = None
        self._unix_server: asyncio.Server | None = None
        self._peer_server: asyncio.Server | None = None
        self._sessions: dict[tuple[int, int], ClientSession] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _StartupConnection(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            # Workers share the port; the kernel spreads connections across them.
            reuse_port=bool(self.config.peers),
            backlog=1024,
        )
        await self._start_unix()
        self.spawn(
            ControlFollower(self._control_plane, self.router, self.config.holder_id, self.metrics).run()
        )
        if self.config.peers:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.config.peers[self.config.worker_index])
            self._peer_server = await asyncio.start_unix_server(self._peer_cancel, sock=sock)
        log.info(
            "PG Gateway worker %d listening on %s:%d", self.config.worker_index, self.config.host, self.port
        )

    async def _start_unix(self) -> None:
        """Accept on the Unix socket too: the supervisor's (every worker accepts on the one
        socket, the kernel hands each connection to one of them), or one bound here."""
        if self.config.unix_fd is not None:
            sock = socket.socket(fileno=self.config.unix_fd)
        elif self.config.unix_dir:
            sock = await asyncio.to_thread(pg_socket.bind, Path(self.config.unix_dir), self.port)
        else:
            return
        sock.setblocking(False)
        self._unix_server = await asyncio.get_running_loop().create_unix_server(
            lambda: _StartupConnection(self, local=True), sock=sock
        )

    @property
    def unix_path(self) -> str:
        """The Unix socket's path ("" without one)."""
        if self._unix_server is None:
            return ""
        return str(self._unix_server.sockets[0].getsockname())

    async def stop(self) -> None:
        """Stop accepting, tell every client, release every lease."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self._unix_server is not None:
            path = self.unix_path
            self._unix_server.close()
            if self.config.unix_fd is None and path:
                # Ours alone; an inherited socket is the supervisor's to remove.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if self._peer_server is not None:
            self._peer_server.close()
        for session in list(self._sessions.values()):
            session.fatal(errors.shutting_down())
        await self.router.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def session_finished(self, session: ClientSession) -> None:
        if self._sessions.get(session.cancel_key) is session:
            del self._sessions[session.cancel_key]
        self.metrics.client_connections.dec()

    def sessions(self) -> list[ClientSession]:
        return list(self._sessions.values())

    # -- one connection -----------------------------------------------------------------------
    async def handle(self, conn: _StartupConnection) -> None:
        self.metrics.client_connections_total.inc()
        span = tracer.start_span("pggateway.connection")
        handed_over = False
        try:
            # Current while accepting, so the wake-up span is this connection's child.
            with trace.use_span(span, end_on_exit=False):
                handed_over = await self._handle(conn, span)
        except errors.PgError as err:
            self._refuse(conn, span, err)
        except pq.ProtocolError as exc:
            log.info("protocol violation from a client: %s", exc)
            self.metrics.auth_failures_total.labels("protocol").inc()
            self._refuse(conn, span, errors.protocol_violation(str(exc)))
        except (_Disconnected, ConnectionError, ssl.SSLError) as exc:
            if isinstance(exc, ssl.SSLError):
                self.metrics.tls_handshake_failures_total.inc()
            span.set_attribute(ATTR_PG_OUTCOME, "client_gone")
            self.metrics.connection_errors_total.labels(errors.CLIENT).inc()
            conn.close()
        except TimeoutError:
            span.set_attribute(ATTR_PG_OUTCOME, "handshake_timeout")
            self.metrics.connection_errors_total.labels(errors.CLIENT).inc()
            conn.close()
        except asyncio.CancelledError:
            self._refuse(conn, span, errors.shutting_down())
            raise
        except Exception:
            log.exception("unexpected error while accepting a client")
            span.set_status(Status(StatusCode.ERROR))
            self._refuse(conn, span, errors.internal())
        finally:
            if not handed_over:
                span.end()

    def _refuse(self, conn: _StartupConnection, span: Span, err: errors.PgError) -> None:
        span.set_attribute(ATTR_PG_OUTCOME, err.sqlstate)
        self.metrics.connection_errors_total.labels(err.kind).inc()
        conn.write(err.to_wire())
        conn.close()

    async def _handle(self, conn: _StartupConnection, span: Span) -> bool:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            packet = await self._negotiate(conn)
            if packet is None:
                return False
            user, database, settings = self._startup_params(packet)
            span.set_attribute(ATTR_PG_USER, user)
            span.set_attribute(ATTR_DATABASE, database)
            if packet.minor > 0 or any(k.startswith("_pq_.") for k in packet.params):
                conn.write(
                    pq.negotiate_protocol_version(0, [k for k in packet.params if k.startswith("_pq_.")])
                )
            creds = await self._authenticate(conn, user, database)
        span.set_attribute(ATTR_TENANT, creds.tenant_id)
        if self._stopping:
            raise errors.shutting_down()
        route = self.router.get(creds.tenant_id, database)
        await route.attach(creds)
        attached = True
        try:
            b = await route.checkout(loop.time() + self.config.checkout_timeout)
            cancel_key = self._new_cancel_key()
            assert conn.transport is not None
            session = ClientSession(self, route, conn.transport, settings, cancel_key, span)
            await session.apply_settings(b)
            reported = dict(b.reported)
            route.pool.release(b)
            if conn.closed:
                raise _Disconnected()
            out = [pq.parameter_status(k, v) for k, v in reported.items()]
            out.append(pq.backend_key_data(*cancel_key))
            out.append(pq.ready_for_query(b"I"))
            conn.write(b"".join(out))
            self._sessions[cancel_key] = session
            self.metrics.client_connections.inc()
            attached = False  # the session detaches from the route when it finishes
            span.set_attribute(ATTR_PG_OUTCOME, "connected")
            session.start(conn.leftover())
            return True
        finally:
            if attached:
                route.detach()

    async def _negotiate(self, conn: _StartupConnection) -> pq.StartupPacket | None:
        """Through SSLRequest / GSSENCRequest to the StartupMessage; None after a CancelRequest."""
        while True:
            packet = await conn.read_startup()
            if packet.code == pq.SSL_REQUEST:
                if conn.tls:
                    raise pq.ProtocolError("SSLRequest inside TLS")
                if conn.local:
                    conn.write(b"N")  # as PostgreSQL answers on its Unix socket
                    continue
                conn.write(b"S")
                await conn.start_tls(self._ssl)
            elif packet.code == pq.GSSENC_REQUEST:
                if conn.tls:
                    raise pq.ProtocolError("GSSENCRequest inside TLS")
                conn.write(b"N")
            elif packet.code == pq.CANCEL_REQUEST:
                await self._cancel(packet.pid, packet.secret)
                conn.close()
                return None
            elif not conn.tls and not conn.local:
                self.metrics.auth_failures_total.labels("ssl_required").inc()
                raise errors.ssl_required()
            else:
                return packet

    def _startup_params(self, packet: pq.StartupPacket) -> tuple[str, str, dict[str, tuple[str, str]]]:
        params = packet.params
        user = params.get("user", "")
        if not user:
            raise errors.PgError("28000", "no PostgreSQL user name specified in startup packet", errors.USER)
        database = params.get("database") or user
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise errors.unsupported("replication")
        return user, database, client_settings(params)

    async def _authenticate(self, conn: _StartupConnection, user: str, database: str) -> Credentials:
        """SCRAM against the stored verifier; unknown users walk the same path to the same error."""
        creds: Credentials | None
        try:
            creds = await self._credentials.get(user)
        except ControlPlaneError as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                log.warning("looking up the credentials of a client failed: %s", err)
                raise errors.from_control_plane(err, user=user, database=database, acquiring=False) from None
            creds = None
        verifier = Verifier.decoy(self._decoy_secret, user)
        if creds is not None:
            try:
                verifier = Verifier.parse(creds.scram_verifier)
            except ScramError:
                log.error("the stored SCRAM verifier of tenant %s is malformed", creds.tenant_id)
                creds = None
        # Channel binding needs the TLS channel: none on the Unix socket.
        binding = self._channel_binding if conn.tls else None
        conn.write(pq.auth_sasl([SCRAM_SHA_256_PLUS, SCRAM_SHA_256] if binding else [SCRAM_SHA_256]))
        mechanism, first = pq.parse_sasl_initial(await conn.read_message(pq.PASSWORD))
        try:
            scram = ScramServer(mechanism, verifier, binding)
            conn.write(pq.auth_request(pq.AUTH_SASL_CONTINUE, scram.server_first(first)))
            final = scram.server_final(await conn.read_message(pq.PASSWORD))
        except ScramError as exc:
            reason = "unknown_user" if creds is None else "password"
            log.info("authentication of %r failed: %s", user, exc)
            self.metrics.auth_failures_total.labels(reason).inc()
            raise errors.auth_failed(user) from None
        if creds is None:  # a decoy never verifies; belt and braces
            self.metrics.auth_failures_total.labels("unknown_user").inc()
            raise errors.auth_failed(user)
        if creds.status == "suspended":
            self.metrics.auth_failures_total.labels("suspended").inc()
            raise errors.tenant_suspended()
        if creds.status == "deleting":
            self.metrics.auth_failures_total.labels("suspended").inc()
            raise errors.tenant_deleting()
        conn.write(pq.auth_request(pq.AUTH_SASL_FINAL, final) + pq.auth_request(pq.AUTH_OK))
        return creds

    def _new_cancel_key(self) -> tuple[int, int]:
        """An id no real backend can have (see `pggateway.keys`), and a random secret."""
        while True:
            key = keys.new_key(self.config.worker_index)
            if key not in self._sessions:
                return key

    async def _cancel(self, pid: int, secret: int, *, passed_on: bool = False) -> None:
        owner = keys.key_worker(pid)
        if (
            not passed_on
            and owner is not None
            and owner != self.config.worker_index
            and owner < len(self.config.peers)
        ):
            await self._pass_on_cancel(owner, pid, secret)
            return
        session = self._sessions.get((pid, secret))
        b = session.cancel_target() if session is not None else None
        if b is None or not b.pid:
            self.metrics.cancel_requests_total.labels("ignored").inc()
            return
        self.metrics.cancel_requests_total.labels("forwarded").inc()
        await send_cancel(b.target.host, b.target.port, b.pid, b.secret)

    async def _pass_on_cancel(self, owner: int, pid: int, secret: int) -> None:
        """Hand a CancelRequest to the worker that issued its key."""
        try:
            # The owner answers (closes) once it has forwarded the cancel to the compute.
            async with asyncio.timeout(PEER_TIMEOUT + CANCEL_TIMEOUT):
                # Connected by hand: uvloop cannot take an abstract socket name as a path.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, self.config.peers[owner])
                except BaseException:
                    sock.close()
                    raise
                reader, writer = await asyncio.open_unix_connection(sock=sock)
                writer.write(pq.cancel_request(pid, secret))
                await writer.drain()
                await reader.read(1)  # the owner closes once it has acted on it
                writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("could not pass a cancel request on to worker %d: %s", owner, exc)
            self.metrics.cancel_requests_total.labels("ignored").inc()
            return
        self.metrics.cancel_requests_total.labels("passed_on").inc()

    async def _peer_cancel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A CancelRequest another worker received for one of our sessions."""
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                packet = pq.parse_startup(await reader.readexactly(16))
            if packet.code == pq.CANCEL_REQUEST:
                await self._cancel(packet.pid, packet.secret, passed_on=True)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, pq.ProtocolError) as exc:
            log.warning("a passed-on cancel request failed: %s", exc)
        finally:
            writer.close()
