"""The PG Gateway against real PostgreSQL computes and real clients (psql, pgbench, psycopg 3,
asyncpg), all over TLS.

The gateway runs in-process on its own uvloop thread. Its control plane is `FakeControlPlane`:
the one stand-in here, with the same four calls as the gRPC-backed one, answering the way the
accounts and databases services do (NOT_FOUND for unknown users and databases, `booting` while it
starts a stopped compute) in front of real PostgreSQL servers started with libs.embedded_pg.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psycopg
import pytest
import uvloop

from libs.embedded_pg import EmbeddedPostgres
from pggateway import keys
from pggateway import protocol as pq
from pggateway.controlplane import ControlMessage, ControlPlaneError, Credentials, LeaseInfo
from pggateway.metrics import GatewayMetrics
from pggateway.scram import Verifier
from pggateway.server import GatewayConfig, GatewayServer
from pggateway.tls import TlsMaterial, ensure_material
from tests.fixtures.mesh import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "60"}
TENANT_ID = "ten_alpha"
USER = "tnt_alpha"
PASSWORD = "Alpha-pw-7d1f"
SUSPENDED_USER = "tnt_frozen"


def _pg_tool(name: str) -> str:
    for cand in (Path("/usr/lib/postgresql/15/bin") / name, shutil.which(name)):
        if cand and os.access(cand, os.X_OK):
            return str(cand)
    raise RuntimeError(f"{name} is not installed")


# -- the stand-in control plane ---------------------------------------------------------------


@dataclass
class FakeDatabase:
    pg: EmbeddedPostgres
    name: str  # inside the compute
    never_ready: bool = False
    frozen: bool = False
    boot: threading.Thread | None = None


@dataclass
class FakeControlPlane:
    """Answers like accounts.LookupPgCredentials and databases.LeaseService: a stopped compute is
    started (the lease says `booting` until it accepts logins), unknown names are NOT_FOUND."""

    users: dict[str, Credentials] = field(default_factory=dict)
    databases: dict[tuple[str, str], FakeDatabase] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    _epoch: int = 1

    async def lookup_credentials(self, pg_user: str) -> Credentials:
        self.calls.append(("lookup", pg_user))
        if pg_user not in self.users:
            raise ControlPlaneError(grpc.StatusCode.NOT_FOUND, "NotFound", f"pg_user {pg_user!r} not found")
        return self.users[pg_user]

    def _state(self, db: FakeDatabase) -> str:
        if db.never_ready:
            return "booting"
        if db.boot is not None and db.boot.is_alive():
            return "booting"
        if not db.pg.is_running():
            db.boot = threading.Thread(target=db.pg.start, daemon=True)
            db.boot.start()
            return "booting"
        return "ready"

    def _lease(self, tenant_id: str, database: str, db: FakeDatabase, state: str) -> LeaseInfo:
        ready = state == "ready"
        return LeaseInfo(
            lease_id=f"lease-{tenant_id}-{database}",
            db_id=f"db-{database}",
            epoch=self._epoch,
            state=state,
            writer_host=db.pg.host if ready else "",
            writer_port=db.pg.port if ready else 0,
            freeze_new_checkouts=db.frozen,
            writer_database=db.name,
        )

    async def acquire_lease(
        self, tenant_id: str, database: str, holder_id: str, ttl: float, wait: float
    ) -> LeaseInfo:
        self.calls.append(("acquire", database, wait))
        db = self.databases.get((tenant_id, database))
        if db is None:
            raise ControlPlaneError(grpc.StatusCode.NOT_FOUND, "NotFound", f"database {database!r} not found")
        state = self._state(db)
        deadline = time.monotonic() + wait
        while state != "ready" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            state = self._state(db)
        return self._lease(tenant_id, database, db, state)

    async def renew_lease(
        self, lease_id: str, epoch: int, ttl: float, active_connections: int, report: Any = None
    ) -> LeaseInfo:
        self.calls.append(("renew", lease_id, active_connections))
        for (tenant_id, name), db in self.databases.items():
            if lease_id == f"lease-{tenant_id}-{name}":
                return self._lease(tenant_id, name, db, self._state(db))
        raise ControlPlaneError(grpc.StatusCode.NOT_FOUND, "NotFound", "lease not found")

    async def release_lease(self, lease_id: str, epoch: int) -> None:
        self.calls.append(("release", lease_id))

    async def watch_control(self, holder_id: str) -> AsyncIterator[ControlMessage]:
        """The control stream: HELLO, then nothing (these tests freeze through the lease)."""
        yield ControlMessage("HELLO")
        await asyncio.Event().wait()

    def count(self, kind: str, key: str | None = None) -> int:
        return sum(1 for c in self.calls if c[0] == kind and (key is None or c[1] == key))


# -- the gateway on its own loop --------------------------------------------------------------


class GatewayThread:
    """A real GatewayServer on a uvloop in a background thread, so tests can use blocking clients."""

    def __init__(self, cp: FakeControlPlane, tls: TlsMaterial, **overrides: Any) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = GatewayConfig(host="127.0.0.1", port=0, holder_id="test-gateway", **overrides)
        self.server = GatewayServer(config, cp, tls, GatewayMetrics())
        self.call(self.server.start())
        self.port = self.server.port

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def metric(self, name: str, **labels: str) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Env:
    cp: FakeControlPlane
    gw: GatewayThread
    compute: EmbeddedPostgres
    spare: EmbeddedPostgres
    tls: TlsMaterial
    # The directory of the gateway's Unix socket (`.s.PGSQL.<port>` inside).
    sock_dir: Path

    def dsn(self, database: str = "app", user: str = USER, password: str = PASSWORD, **params: str) -> str:
        extra = "&".join(f"{k}={v}" for k, v in {"sslmode": "require", **params}.items())
        return f"postgresql://{user}:{password}@127.0.0.1:{self.gw.port}/{database}?{extra}"

    def verify_full_dsn(self, database: str = "app") -> str:
        return (
            f"postgresql://{USER}:{PASSWORD}@localhost:{self.gw.port}/{database}"
            f"?sslmode=verify-full&sslrootcert={self.tls.ca_path}"
        )


def _make_compute(root: Path, verifier: str, databases: list[str]) -> EmbeddedPostgres:
    """A compute as the databases service prepares one: the tenant's role (with the SCRAM
    verifier accounts stores, never a plaintext password) owning the tenant's databases."""
    pg = EmbeddedPostgres(root, port=free_port(), settings=FAST)
    pg.start()
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{verifier}'")
        for name in databases:
            conn.execute(f"CREATE DATABASE {name} OWNER {USER}")
    return pg


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("pggw")
    verifier = Verifier.from_password(PASSWORD).text()
    compute = _make_compute(root / "compute", verifier, ["app", "bench"])
    spare = _make_compute(root / "spare", verifier, ["spare"])
    cp = FakeControlPlane()
    cp.users[USER] = Credentials(TENANT_ID, "alpha", USER, verifier, "active", PASSWORD)
    frozen_verifier = Verifier.from_password("frozen-pw").text()
    cp.users[SUSPENDED_USER] = Credentials(
        "ten_frozen", "frozen", SUSPENDED_USER, frozen_verifier, "suspended", "x"
    )
    cp.databases[(TENANT_ID, "app")] = FakeDatabase(compute, "app")
    cp.databases[(TENANT_ID, "bench")] = FakeDatabase(compute, "bench")
    cp.databases[(TENANT_ID, "spare")] = FakeDatabase(spare, "spare")
    cp.databases[(TENANT_ID, "never")] = FakeDatabase(compute, "app", never_ready=True)
    tls = ensure_material(root / "data", "pg.example.test")
    sock_dir = Path(tempfile.mkdtemp(prefix="pggw-sock-"))  # short: AF_UNIX paths are 107 bytes at most
    gw = GatewayThread(
        cp,
        tls,
        pool_size=3,
        wake_timeout=20.0,
        checkout_timeout=10.0,
        lease_ttl=1.5,
        release_grace=0.3,
        unix_dir=str(sock_dir),
    )
    try:
        yield Env(cp, gw, compute, spare, tls, sock_dir)
    finally:
        gw.stop()
        compute.destroy()
        spare.destroy()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _psql(env: Env, sql: str, **pgenv: str) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.update({"PGHOST": "127.0.0.1", "PGPORT": str(env.gw.port), "PGUSER": USER, "PGPASSWORD": PASSWORD})
    e.update({"PGDATABASE": "app", "PGSSLMODE": "require", "PGCONNECT_TIMEOUT": "20"})
    e.update(pgenv)
    return subprocess.run(
        [_pg_tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        env=e,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _read_error(sock: socket.socket) -> dict[str, str]:
    data = b""
    while len(data) < 5 or len(data) < 1 + int.from_bytes(data[1:5], "big"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data[:1] == b"E", data
    return pq.parse_fields(data[5 : 1 + int.from_bytes(data[1:5], "big")])


# -- TLS and authentication -------------------------------------------------------------------


def test_psql_connects_with_sslmode_require_and_verify_full(env: Env) -> None:
    """psql reaches the tenant's database through the gateway with sslmode=require and with
    verify-full against the gateway's own CA (host name localhost), authenticating with SCRAM."""
    r = _psql(env, "select current_user || '|' || current_database()")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{USER}|app"
    r = _psql(env, "\\conninfo")
    assert "SSL connection (protocol: TLSv1.3" in r.stdout, r.stdout + r.stderr

    r = _psql(
        env, "select 42", PGHOST="localhost", PGSSLMODE="verify-full", PGSSLROOTCERT=str(env.tls.ca_path)
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"
    # libpq picks SCRAM-SHA-256-PLUS (channel binding) when offered; requiring it must work too.
    r = _psql(env, "select 1", PGCHANNELBINDING="require")
    assert r.returncode == 0, r.stderr
    assert env.tls.ca_path is not None
    assert (env.tls.ca_path.stat().st_mode & 0o777) == 0o644
    assert (env.tls.key_path.stat().st_mode & 0o777) == 0o600


def test_plaintext_startup_is_refused_with_a_clear_error(env: Env) -> None:
    """A StartupMessage without TLS gets FATAL 28000 telling the user to use sslmode=require."""
    r = _psql(env, "select 1", PGSSLMODE="disable")
    assert r.returncode != 0
    assert "SSL required: connect with sslmode=require" in r.stderr

    with socket.create_connection(("127.0.0.1", env.gw.port), timeout=5) as sock:
        sock.sendall(pq.startup_message({"user": USER, "database": "app"}))
        fields = _read_error(sock)
    assert fields["S"] == "FATAL" and fields["C"] == "28000"

    # GSSENCRequest is declined with 'N' and the client may then ask for TLS.
    with socket.create_connection(("127.0.0.1", env.gw.port), timeout=5) as sock:
        sock.sendall((8).to_bytes(4, "big") + pq.GSSENC_REQUEST.to_bytes(4, "big"))
        assert sock.recv(1) == b"N"
        sock.sendall(pq.ssl_request())
        assert sock.recv(1) == b"S"


def test_wrong_password_and_unknown_user_get_the_same_28p01(env: Env) -> None:
    """A wrong password and a user that does not exist are indistinguishable: same SQLSTATE,
    same message shape, same exchange (the unknown user is walked through SCRAM with a decoy)."""

    async def attempt(user: str, password: str) -> asyncpg.PostgresError:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(env.dsn(user=user, password=password))
        return info.value

    wrong = asyncio.run(attempt(USER, "not-the-password"))
    unknown = asyncio.run(attempt("tnt_nobody", PASSWORD))
    assert wrong.sqlstate == unknown.sqlstate == "28P01"
    assert str(wrong) == f'password authentication failed for user "{USER}"'
    assert str(unknown) == 'password authentication failed for user "tnt_nobody"'

    bad = _psql(env, "select 1", PGPASSWORD="nope")
    nobody = _psql(env, "select 1", PGUSER="tnt_nobody")
    assert bad.stderr.replace(USER, "U") == nobody.stderr.replace("tnt_nobody", "U")
    assert env.gw.metric("pggateway_auth_failures_total", reason="password") >= 2
    assert env.gw.metric("pggateway_auth_failures_total", reason="unknown_user") >= 2


def test_unknown_database_and_suspended_tenant_are_refused(env: Env) -> None:
    """An unknown database is 3D000 (after authentication, so names cannot be probed); a
    suspended tenant with the right password is refused with a clear 28000."""

    async def attempt(**kw: str) -> asyncpg.PostgresError:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(env.dsn(**kw))
        return info.value

    missing = asyncio.run(attempt(database="nosuchdb"))
    assert missing.sqlstate == "3D000"
    assert str(missing) == 'database "nosuchdb" does not exist'

    suspended = asyncio.run(attempt(user=SUSPENDED_USER, password="frozen-pw"))
    assert suspended.sqlstate == "28000"
    assert "suspended" in str(suspended)
    # The wrong password of a suspended tenant reveals nothing about its status.
    assert asyncio.run(attempt(user=SUSPENDED_USER, password="guess")).sqlstate == "28P01"


def test_unix_socket_skips_tls_but_keeps_scram_and_every_other_rule(env: Env) -> None:
    """On its Unix socket the gateway answers SSLRequest 'N' and takes a plaintext startup
    (libpq's PGHOST=<directory>, with sslmode=require ignored there as libpq does), still
    authenticates with SCRAM (wrong password and unknown user: the same 28P01; no -PLUS without
    TLS), refuses a suspended tenant, and pools and cancels as over TCP; TCP still needs TLS."""
    sock = env.sock_dir / f".s.PGSQL.{env.gw.port}"
    assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o777
    assert env.gw.server.unix_path == str(sock)
    local = {"PGHOST": str(env.sock_dir), "PGSSLMODE": "disable"}
    r = _psql(env, "select current_user || '|' || current_database()", **local)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{USER}|app"
    info = _psql(env, "\\conninfo", **local)
    assert f'via socket in "{env.sock_dir}"' in info.stdout and "SSL" not in info.stdout, info.stdout
    # libpq never asks for TLS on a Unix socket, whatever sslmode says.
    assert _psql(env, "select 1", PGHOST=str(env.sock_dir)).returncode == 0
    # No TLS channel, so no channel binding: a client that requires it is refused by libpq.
    bound = _psql(env, "select 1", PGCHANNELBINDING="require", **local)
    assert bound.returncode != 0 and "channel binding" in bound.stderr
    bad = _psql(env, "select 1", PGPASSWORD="nope", **local)
    nobody = _psql(env, "select 1", PGUSER="tnt_nobody", **local)
    assert bad.returncode != 0 and nobody.returncode != 0
    assert f'password authentication failed for user "{USER}"' in bad.stderr
    assert bad.stderr.replace(USER, "U") == nobody.stderr.replace("tnt_nobody", "U")
    frozen = _psql(env, "select 1", PGUSER=SUSPENDED_USER, PGPASSWORD="frozen-pw", **local)
    assert frozen.returncode != 0 and "suspended" in frozen.stderr
    # TCP is unchanged: no TLS, no login.
    assert "SSL required" in _psql(env, "select 1", PGSSLMODE="disable").stderr

    # The raw exchange: SSLRequest 'N', GSSENCRequest 'N', then SCRAM-SHA-256 alone.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(5)
        raw.connect(str(sock))
        raw.sendall(pq.ssl_request())
        assert raw.recv(1) == b"N"
        raw.sendall((8).to_bytes(4, "big") + pq.GSSENC_REQUEST.to_bytes(4, "big"))
        assert raw.recv(1) == b"N"
        raw.sendall(pq.startup_message({"user": USER, "database": "app"}))
        head = raw.recv(4096)
    assert head[:1] == b"R" and b"SCRAM-SHA-256\x00" in head and b"PLUS" not in head

    async def drivers() -> tuple[int, str]:
        conn = await asyncpg.connect(
            host=str(env.sock_dir), port=env.gw.port, user=USER, password=PASSWORD, database="app"
        )
        try:
            one = await conn.fetchval("select 1")
        finally:
            await conn.close()
        async with await psycopg.AsyncConnection.connect(
            host=str(env.sock_dir), port=env.gw.port, user=USER, password=PASSWORD, dbname="app"
        ) as pc:
            cur = await pc.execute("select current_database()")
            row = await cur.fetchone()
        assert row is not None
        return one, row[0]

    assert asyncio.run(drivers()) == (1, "app")

    # A cancel sent over the socket reaches the backend of a query running over the socket.
    with psycopg.connect(
        host=str(env.sock_dir), port=env.gw.port, user=USER, password=PASSWORD, dbname="app", autocommit=True
    ) as conn:
        # cancel_safe: the legacy PQcancel holds the GIL, and this gateway shares the process.
        threading.Timer(0.5, conn.cancel_safe).start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        assert time.monotonic() - started < 10
        assert conn.execute("select 7").fetchone() == (7,)
    # psql's Ctrl-C: libpq 15's plaintext cancel connection, over the socket.
    psql = subprocess.Popen(
        [
            _pg_tool("psql"),
            *("-X", "-h", str(env.sock_dir), "-p", str(env.gw.port), "-U", USER, "-d", "app"),
            *("-c", "select pg_sleep(10)"),
        ],
        env={**os.environ, "PGPASSWORD": PASSWORD},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.8)
    started = time.monotonic()
    psql.send_signal(signal.SIGINT)
    _, err = psql.communicate(timeout=10)
    assert time.monotonic() - started < 5 and "canceling statement due to user request" in err


# -- drivers ----------------------------------------------------------------------------------


def test_psycopg_and_asyncpg_work_through_tls(env: Env) -> None:
    """psycopg 3 (verify-full) and asyncpg (TLS, default named statements and the unnamed mode)
    run queries, parameters, transactions and COPY through the gateway."""
    with psycopg.connect(env.verify_full_dsn(), application_name="ck") as conn:
        assert conn.info.parameter_status("application_name") == "ck"
        assert conn.info.parameter_status("server_encoding") == "UTF8"
        assert conn.execute("select %s::int + %s::int", (40, 2)).fetchone() == (42,)
        conn.execute("create table if not exists drivers (k text primary key, v int)")
        conn.execute("truncate drivers")
        with conn.cursor() as cur, cur.copy("copy drivers (k, v) from stdin") as copy:
            for i in range(100):
                copy.write_row((f"k{i}", i))
        conn.commit()
        assert conn.execute("select count(*), sum(v) from drivers").fetchone() == (100, 4950)
        assert conn.execute("show application_name").fetchone() == ("ck",)

    async def with_asyncpg() -> None:
        ctx = ssl.create_default_context(cafile=str(env.tls.ca_path))
        conn = await asyncpg.connect(env.verify_full_dsn().split("?")[0], ssl=ctx)
        try:
            assert await conn.fetchval("select $1::int * 2", 21) == 42
            async with conn.transaction():
                await conn.execute("insert into drivers values ($1, $2)", "async", 7)
            assert await conn.fetchval("select v from drivers where k = $1", "async") == 7
        finally:
            await conn.close()
        conn = await asyncpg.connect(env.dsn(), statement_cache_size=0)
        try:
            rows = await conn.fetch("select g from generate_series(1, 3) g where g > $1", 1)
            assert [r["g"] for r in rows] == [2, 3]
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())


# -- pooling ----------------------------------------------------------------------------------


def test_transaction_pooling_serves_more_clients_than_backends(env: Env) -> None:
    """Twelve clients run interleaved transactions over a pool of three backends: every
    transaction commits exactly once, no session is pinned, and the compute never sees more than
    three gateway connections."""
    with psycopg.connect(env.dsn(), autocommit=True) as conn:
        conn.execute("create table if not exists ledger (client int, n int, primary key (client, n))")
        conn.execute("truncate ledger")
    named_before = env.gw.metric("pggateway_pins_total", reason="named_statement")
    checkouts_before = env.gw.metric("pggateway_checkout_wait_seconds_count")
    pids: set[int] = set()
    errors: list[BaseException] = []
    peak = [0]

    def client(i: int) -> None:
        try:
            # prepare_threshold=None: the unnamed extended protocol only (named statements are
            # tested in test_pggateway_prepared.py).
            with psycopg.connect(env.dsn(), autocommit=True, prepare_threshold=None) as conn:
                for n in range(15):
                    with conn.transaction():
                        conn.execute("insert into ledger values (%s, %s)", (i, n))
                        pids.add(conn.execute("select pg_backend_pid()").fetchone()[0])  # type: ignore[index]
                    conn.execute("select 1").fetchone()
        except BaseException as exc:
            errors.append(exc)

    def watch(stop: threading.Event) -> None:
        with psycopg.connect(env.compute.dsn_for("app"), autocommit=True) as admin:
            while not stop.is_set():
                row = admin.execute(
                    "select count(*) from pg_stat_activity where usename = %s", (USER,)
                ).fetchone()
                peak[0] = max(peak[0], row[0])  # type: ignore[index]
                time.sleep(0.01)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    stop.set()
    watcher.join(5)
    assert not errors, errors
    with psycopg.connect(env.dsn()) as conn:
        assert conn.execute("select count(*), count(distinct client) from ledger").fetchone() == (180, 12)
    assert len(pids) <= 3
    assert peak[0] <= 3
    assert env.gw.metric("pggateway_pins_total", reason="named_statement") == named_before
    assert env.gw.metric("pggateway_checkout_wait_seconds_count") - checkouts_before >= 360


def test_a_client_waits_for_a_busy_pool_then_gets_53300(env: Env) -> None:
    """With every backend held by an open transaction a client waits (the wait is measured), gets
    the backend when the transaction ends, and gets FATAL 53300 once the checkout timeout passes."""
    gw = GatewayThread(env.cp, env.tls, pool_size=1, checkout_timeout=0.6)
    dsn = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{gw.port}/app?sslmode=require"
    try:
        with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as waiter:
            holder.execute("select 1")  # a transaction is open: the only backend is held
            threading.Timer(0.3, holder.commit).start()
            t0 = time.monotonic()
            assert waiter.execute("select 2").fetchone() == (2,)
            assert 0.25 < time.monotonic() - t0 < 0.6
            holder.execute("select 3")
            with pytest.raises(psycopg.OperationalError) as info:
                waiter.execute("select 4")
            assert info.value.sqlstate == "53300"
        assert gw.metric("pggateway_checkout_wait_seconds_bucket", le="0.1") < gw.metric(
            "pggateway_checkout_wait_seconds_count"
        )
        assert gw.metric("pggateway_checkout_timeouts_total") == 1
    finally:
        gw.stop()


def test_set_pins_the_session_and_does_not_leak(env: Env) -> None:
    """A client that SETs a session parameter keeps its backend (the setting stays, the backend
    pid stays) while other clients never see that setting; unpinned SET LOCAL does not pin."""
    pinned0 = env.gw.metric("pggateway_pinned_sessions")
    opts: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}
    with psycopg.connect(env.dsn(), **opts) as a, psycopg.connect(env.dsn(), **opts) as b:
        a.execute("set statement_timeout = '4321ms'")
        assert env.gw.metric("pggateway_pinned_sessions") == pinned0 + 1
        pid = a.execute("select pg_backend_pid()").fetchone()
        for _ in range(20):
            assert b.execute("show statement_timeout").fetchone() == ("0",)
            assert a.execute("show statement_timeout").fetchone() == ("4321ms",)
            assert a.execute("select pg_backend_pid()").fetchone() == pid
        with b.transaction():
            b.execute("set local work_mem = '7MB'")
            assert b.execute("show work_mem").fetchone() == ("7MB",)
        assert b.execute("show work_mem").fetchone() != ("7MB",)
        assert env.gw.metric("pggateway_pinned_sessions") == pinned0 + 1
    time.sleep(0.2)
    assert env.gw.metric("pggateway_pinned_sessions") == pinned0
    assert env.gw.metric("pggateway_pins_total", reason="set") >= 1
    # The pinned backend went back after DISCARD ALL: nobody inherits the timeout.
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        for _ in range(5):
            assert c.execute("show statement_timeout").fetchone() == ("0",)


def test_named_prepared_statements_pool_and_pin_only_when_the_gateway_keeps_none(env: Env) -> None:
    """Named prepared statements (psycopg prepare=True, asyncpg's statement cache) keep pooling
    while the gateway keeps them (max_prepared_statements > 0, the default); with 0 they pin the
    session as before. The unnamed extended protocol pools either way."""

    def run(dsn: str) -> None:
        with psycopg.connect(dsn) as conn:
            for i in range(3):
                assert conn.execute("select %s::int", (i,), prepare=False).fetchone() == (i,)
            for i in range(3):
                assert conn.execute("select %s::int + 1", (i,), prepare=True).fetchone() == (i + 1,)

        async def asyncpg_modes() -> None:
            conn = await asyncpg.connect(dsn, statement_cache_size=0)
            for i in range(5):
                assert await conn.fetchval("select $1::int", i) == i
            await conn.close()
            conn = await asyncpg.connect(dsn)
            stmt = await conn.prepare("select $1::int * 3")
            assert [await stmt.fetchval(i) for i in range(3)] == [0, 3, 6]
            await conn.close()

        asyncio.run(asyncpg_modes())

    before = env.gw.metric("pggateway_pins_total", reason="named_statement")
    run(env.dsn())
    assert env.gw.metric("pggateway_pins_total", reason="named_statement") == before
    assert env.gw.metric("pggateway_prepared_statements") > 0

    off = GatewayThread(env.cp, env.tls, pool_size=3, max_prepared_statements=0)
    try:
        run(f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{off.port}/app?sslmode=require")
        # psycopg's prepare=True and asyncpg's statement cache: one pin each.
        assert off.metric("pggateway_pins_total", reason="named_statement") == 2
        assert off.metric("pggateway_prepared_statements") == 0
    finally:
        off.stop()


def test_cancel_request_reaches_the_right_backend(env: Env) -> None:
    """A CancelRequest with the gateway-issued key cancels `select pg_sleep(10)` on the backend
    serving that client — from psql on Ctrl-C (libpq 15: a plaintext cancel connection), psycopg's
    cancel_safe (libpq 17+: a cancel inside TLS) and asyncpg — and the session keeps working."""
    e = {**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "require"}
    dsn = f"host=127.0.0.1 port={env.gw.port} user={USER} dbname=app"
    psql = subprocess.Popen(
        [_pg_tool("psql"), "-X", "-d", dsn, "-c", "select pg_sleep(10)"],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.8)
    t0 = time.monotonic()
    psql.send_signal(signal.SIGINT)
    _, err = psql.communicate(timeout=10)
    assert time.monotonic() - t0 < 5
    assert "canceling statement due to user request" in err

    with psycopg.connect(env.dsn(), autocommit=True) as conn:
        # cancel_safe, not cancel: the legacy PQcancel holds the GIL, and this gateway shares
        # the test's process.
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
        assert time.monotonic() - t0 < 5
        assert conn.execute("select 7").fetchone() == (7,)

    async def asyncpg_cancel() -> None:
        conn = await asyncpg.connect(env.dsn())
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("select pg_sleep(10)", timeout=0.5)
        assert time.monotonic() - t0 < 5
        assert await conn.fetchval("select 8") == 8
        await conn.close()

    asyncio.run(asyncpg_cancel())
    assert env.gw.metric("pggateway_cancel_requests_total", outcome="forwarded") >= 3


def test_backend_pid_is_never_a_real_pid_so_terminate_hits_nobody(env: Env) -> None:
    """The BackendKeyData pid a client gets (psycopg's backend_pid, asyncpg's get_server_pid) is
    above Linux's largest pid_max, so pg_terminate_backend of it returns false and kills no
    backend, while cancel with the same key still works."""
    with (
        psycopg.connect(env.dsn(), autocommit=True) as other,
        psycopg.connect(env.dsn(), autocommit=True) as c,
    ):
        other.execute("begin")  # keeps its backend while the other client runs
        victim = other.execute("select pg_backend_pid()").fetchone()
        pids = set()
        for _ in range(30):
            with psycopg.connect(env.dsn()) as conn:
                pids.add(conn.info.backend_pid)
        pids.add(c.info.backend_pid)
        assert all(keys.LINUX_PID_MAX_LIMIT < pid < 2**31 for pid in pids), pids
        assert len(pids) == 31
        for pid in (c.info.backend_pid, other.info.backend_pid):
            assert c.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (False,)
        assert other.execute("select pg_backend_pid()").fetchone() == victim
        other.execute("commit")

    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(env.dsn())
        try:
            pid = conn.get_server_pid()
            assert pid > keys.LINUX_PID_MAX_LIMIT
            assert await conn.fetchval("select pg_terminate_backend($1)", pid) is False
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("select pg_sleep(10)", timeout=0.3)
            assert await conn.fetchval("select 1") == 1
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())


def _tenant_backends(env: Env) -> set[int]:
    with psycopg.connect(env.compute.dsn_for("app"), autocommit=True) as admin:
        rows = admin.execute(
            "select pid from pg_stat_activity where usename = %s and datname = 'app'", (USER,)
        ).fetchall()
    return {r[0] for r in rows}


def test_a_terminated_backend_is_dropped_alone(env: Env) -> None:
    """A client that runs pg_terminate_backend(pg_backend_pid()) gets PostgreSQL's own FATAL
    57P01; the gateway drops that backend alone (the compute still answers), so the other
    pooled backends keep their pids, and it counts a lost backend, not a lost compute; the same
    for an idle pooled backend an administrator terminates."""
    gw = GatewayThread(env.cp, env.tls, pool_size=3)
    dsn = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{gw.port}/app?sslmode=require"
    try:
        before = _tenant_backends(env)
        conns = [psycopg.connect(dsn) for _ in range(3)]
        try:
            for c in conns:  # three open transactions: three backends
                c.execute("select 1")
            pooled = _tenant_backends(env) - before
            assert len(pooled) == 3
            for c in conns:
                c.commit()
        finally:
            for c in conns:
                c.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            victim = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            assert victim in pooled
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("select pg_terminate_backend(pg_backend_pid())")
        assert info.value.sqlstate == "57P01"
        assert "terminating connection due to administrator command" in str(info.value)
        assert "went away" not in str(info.value)
        deadline = time.monotonic() + 5
        while gw.metric("pggateway_backends_lost_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the probe of the writer has answered
        assert gw.metric("pggateway_backends_lost_total") == 1
        assert gw.metric("pggateway_compute_lost_total") == 0
        assert pooled - {victim} <= _tenant_backends(env)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("select pg_backend_pid()").fetchone()[0] in pooled - {victim}  # type: ignore[index]
        # An idle pooled backend ended by an administrator: also that backend alone.
        idle_victim, survivor = sorted(pooled - {victim})
        with psycopg.connect(env.compute.dsn_for("app"), autocommit=True) as admin:
            assert admin.execute("select pg_terminate_backend(%s)", (idle_victim,)).fetchone() == (True,)
        deadline = time.monotonic() + 5
        while gw.metric("pggateway_backends_lost_total") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert gw.metric("pggateway_backends_lost_total") == 2
        assert gw.metric("pggateway_compute_lost_total") == 0
        assert survivor in _tenant_backends(env)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("select pg_backend_pid()").fetchone() == (survivor,)
    finally:
        gw.stop()


def test_client_vanishing_mid_query_stops_the_query(env: Env) -> None:
    """A client killed during a long query does not leave it running on the compute: the
    gateway cancels it and closes that backend."""
    e = {**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "require"}
    dsn = f"host=127.0.0.1 port={env.gw.port} user={USER} dbname=app"
    psql = subprocess.Popen(
        [_pg_tool("psql"), "-X", "-d", dsn, "-c", "select pg_sleep(30) as vanishing"], env=e
    )
    running = "select count(*) from pg_stat_activity where query like %s and state = 'active'"
    with psycopg.connect(env.compute.dsn_for("app"), autocommit=True) as admin:
        deadline = time.monotonic() + 10
        while admin.execute(running, ("%as vanishing%",)).fetchone() != (1,):
            assert time.monotonic() < deadline, "the query never started"
            time.sleep(0.05)
        psql.kill()
        psql.wait()
        deadline = time.monotonic() + 5
        while admin.execute(running, ("%as vanishing%",)).fetchone() != (0,):
            assert time.monotonic() < deadline, "the query outlived its client"
            time.sleep(0.05)


# -- lifecycle --------------------------------------------------------------------------------


def test_lease_is_renewed_while_connected_and_released_after(env: Env) -> None:
    """While a client is connected the lease is renewed with its connection count; after the
    last client leaves it is released."""
    lease = f"lease-{TENANT_ID}-bench"
    released = env.cp.count("release", lease)
    with psycopg.connect(env.dsn("bench")) as conn:
        conn.execute("select 1")
        time.sleep(1.3)  # ttl 1.5 s → a renewal every 0.5 s
        renewals = [c for c in env.cp.calls if c[0] == "renew" and c[1] == lease]
        assert len(renewals) >= 2
        assert renewals[-1][2] == 1
        assert env.cp.count("release", lease) == released
    deadline = time.monotonic() + 5
    while env.cp.count("release", lease) == released and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.cp.count("release", lease) == released + 1


def test_wake_on_connect_holds_the_client_until_the_compute_is_up(env: Env) -> None:
    """Connecting to a stopped database starts it and holds the client until it is ready; the
    data written before the stop is there, and the wake-up counts as a cold start."""
    with psycopg.connect(env.dsn("spare"), autocommit=True) as conn:
        conn.execute("create table if not exists kept (v text)")
        conn.execute("insert into kept values ('before stop')")
    time.sleep(0.5)  # the route releases its lease and closes its pool
    env.spare.stop()
    cold = env.gw.metric("pggateway_cold_starts_total")
    t0 = time.monotonic()
    with psycopg.connect(env.dsn("spare"), connect_timeout=30) as conn:
        assert ("before stop",) in conn.execute("select v from kept").fetchall()
    assert time.monotonic() - t0 < 20
    assert env.gw.metric("pggateway_cold_starts_total") == cold + 1


def test_wake_timeout_gives_a_retryable_57p03(env: Env) -> None:
    """A database that stays `booting` longer than the wake timeout gets FATAL 57P03 "the
    database is starting; try again", not a hang."""
    gw = GatewayThread(env.cp, env.tls, wake_timeout=1.0)
    try:

        async def attempt() -> asyncpg.PostgresError:
            with pytest.raises(asyncpg.PostgresError) as info:
                await asyncpg.connect(
                    f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{gw.port}/never?sslmode=require"
                )
            return info.value

        t0 = time.monotonic()
        err = asyncio.run(attempt())
        assert 0.9 < time.monotonic() - t0 < 5
        assert err.sqlstate == "57P03"
        assert err.message == "the database is starting; try again"  # type: ignore[attr-defined]
        assert "Retry with backoff" in (err.hint or "")  # type: ignore[attr-defined]
    finally:
        gw.stop()


def test_freeze_holds_new_checkouts_until_it_clears(env: Env) -> None:
    """While the lease says freeze_new_checkouts, a new transaction waits (it does not fail);
    when the freeze clears it runs."""
    db = env.cp.databases[(TENANT_ID, "app")]
    with psycopg.connect(env.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        db.frozen = True
        try:
            time.sleep(0.8)  # the next renewal (every 0.5 s) sees the freeze
            threading.Timer(0.7, lambda: setattr(db, "frozen", False)).start()
            t0 = time.monotonic()
            assert conn.execute("select 2").fetchone() == (2,)
            assert time.monotonic() - t0 >= 0.4
        finally:
            db.frozen = False


def test_compute_crash_gives_a_clean_error_and_the_next_connection_works(env: Env) -> None:
    """Killing the compute mid-query gives the client FATAL 57P01 with no host or stack in the
    message; the pool is dropped and the next connection waits for the restart and works."""
    with psycopg.connect(env.dsn("spare"), autocommit=True) as conn:
        conn.execute("select 1")
        outcome: dict[str, BaseException] = {}

        def run() -> None:
            try:
                conn.execute("select pg_sleep(5)")
            except BaseException as exc:
                outcome["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.4)
        pid = env.spare.pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        t.join(10)
    err = outcome["error"]
    assert isinstance(err, psycopg.OperationalError)
    assert err.sqlstate == "57P01"
    text = str(err)
    assert "went away" in text and str(env.spare.port) not in text and "Traceback" not in text
    # The pool learns of the loss on its own socket's close, which may come just after the client's.
    deadline = time.monotonic() + 5
    while env.gw.metric("pggateway_compute_lost_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.gw.metric("pggateway_compute_lost_total") >= 1

    with psycopg.connect(env.dsn("spare"), connect_timeout=30) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_pgbench_select_only_through_the_gateway(env: Env) -> None:
    """pgbench (select-only, 4 clients, 2 s) runs through the gateway with TLS without errors."""
    base = {**os.environ, "PGPASSWORD": PASSWORD, "PGUSER": USER}
    init = subprocess.run(
        [_pg_tool("pgbench"), "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(env.compute.port), "bench"],
        env={**base, "PGSSLMODE": "disable"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    run = subprocess.run(
        [
            _pg_tool("pgbench"),
            "-n",
            "-S",
            "-T",
            "2",
            "-c",
            "4",
            "-j",
            "2",
            "-h",
            "127.0.0.1",
            "-p",
            str(env.gw.port),
            "bench",
        ],
        env={**base, "PGSSLMODE": "require"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "number of failed transactions: 0" in run.stdout
    tps = float(run.stdout.split("tps = ")[1].split()[0])
    assert tps > 100


@pytest.mark.parametrize("impl", ["python", "binary"])
def test_large_results_and_copy_to_never_hang_non_blocking_libpq(env: Env, impl: str) -> None:
    """Wide rows from 1,000 B to 40,000 B and COPY TO of 8 MB complete through the gateway with
    psycopg's non-blocking libpq, sync and async, on the system's libpq 15 (`python`: the one
    that hung at 8,976 B while the gateway sent 16 KiB TLS records) and on the wheel's."""
    e = dict(os.environ, PSYCOPG_IMPL=impl)
    r = subprocess.run(
        [sys.executable, "-m", "tests.clients.large_results", env.dsn(), "--copy-mb", "8"],
        env=e,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for check in ("sync wide rows", "sync copy to stdout", "async wide rows", "async copy to stdout"):
        assert f"ok {check}" in r.stdout, r.stdout


LARGE_CHECKS = [
    *(f"sweep {rows} rows" for rows in (3, 5, 1000)),
    *(f"wide {n}" for n in (1, 8191, 8192, 8193, 16383, 16384, 16385, 65536, 1 << 20, 16 << 20, 64 << 20)),
    "rows 65536x1024",
    "copy to 100 MiB",
    "copy from 64 MiB",
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("driver", ["psycopg-sync", "psycopg-async", "asyncpg"])
def test_full_size_results_and_copy_never_hang(env: Env, driver: str) -> None:
    """Through verify-full TLS, one value of every size from 1 B to 64 MiB, 64 MiB in 64 Ki rows,
    COPY TO of 100 MiB and COPY FROM of a 64 MiB table complete, each within 30 s, with psycopg
    sync and async on Debian's libpq 15 (non-blocking, the one that hung) and with asyncpg."""
    client = [sys.executable, "-m", "tests.clients.large_results_full", driver]
    r = subprocess.run(
        [*client, env.verify_full_dsn(), str(env.tls.ca_path)],
        env=dict(os.environ, PSYCOPG_IMPL="python"),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert r.returncode == 0 and r.stdout.rstrip().endswith("done"), r.stdout + r.stderr
    done = [
        line.rsplit(" ", 1)[0].removeprefix("ok ") for line in r.stdout.splitlines() if line.startswith("ok ")
    ]
    assert done == LARGE_CHECKS, r.stdout
    if driver.startswith("psycopg"):
        assert "libpq 15" in r.stdout and "(python)" in r.stdout, r.stdout


@pytest.mark.timeout(120)
def test_psql_full_size_results_and_copy(env: Env, tmp_path: Path) -> None:
    """psql (blocking libpq) through the gateway: a 64 MiB value, COPY TO of 100 MiB into a file
    and \\copy FROM of that 100 MiB file back into a table, every byte accounted for."""
    e = dict(os.environ, PGHOST="localhost", PGPORT=str(env.gw.port), PGUSER=USER, PGPASSWORD=PASSWORD)
    e.update(PGDATABASE="app", PGSSLMODE="verify-full", PGSSLROOTCERT=str(env.tls.ca_path))

    def psql(*sql: str, out: Path | None = None) -> str:
        args = [_pg_tool("psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", *(a for c in sql for a in ("-c", c))]
        with open(out or os.devnull, "wb") as sink:
            r = subprocess.run(
                args, env=e, stdout=sink if out else subprocess.PIPE, stderr=subprocess.PIPE, timeout=60
            )
        assert r.returncode == 0, r.stderr
        return (r.stdout or b"").decode().strip()

    assert psql("select length(repeat('w', 64 * 1024 * 1024))") == str(64 << 20)
    wide = tmp_path / "wide"
    psql("select repeat('w', 64 * 1024 * 1024)", out=wide)
    assert wide.stat().st_size == (64 << 20) + 1  # and psql's newline
    dump = tmp_path / "copy"
    psql("copy (select i, repeat('c', 1016) from generate_series(100001, 202400) i) to stdout", out=dump)
    assert dump.stat().st_size == 102400 * 1024
    psql("create table psql_big (id int, v text)", f"\\copy psql_big from '{dump}'")
    assert psql("select count(*), sum(length(v)) from psql_big") == f"102400|{102400 * 1016}"
    psql("drop table psql_big")
