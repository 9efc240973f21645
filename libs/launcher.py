"""`make run`: the whole mesh on one machine with embedded defaults.

Starts (when CTRLMESH_DATABASE_URL is unset) an embedded PostgreSQL under the data directory,
the ingress's Caddy (unless CTRLMESH_INGRESS_ADMIN_URL names an external one), the five
services, the edge and the PG Gateway as separate processes, waits until each answers its health
check, prints the URLs and the admin API key, and on Ctrl-C (SIGINT) or SIGTERM stops every
process it started — services first, then PostgreSQL — leaving nothing behind.

Supervision: a process that dies while the mesh runs is started again after a backoff
(CTRLMESH_RESTART_BACKOFF doubling up to CTRLMESH_RESTART_BACKOFF_MAX); one that needs more than
CTRLMESH_RESTART_LIMIT restarts within CTRLMESH_RESTART_WINDOW is logged as failed and left
stopped, and the rest keeps serving. The supervisor's view is in `<data_dir>/run/status.json`
(libs/supervision.py): each process that is `restarting` or `failed`; the edge's /health reads
it, so it names a PG Gateway or a Caddy that is down too, and tells one being restarted from one
given up on. The pid of each running
process is in `<data_dir>/run/<name>.pid` (name: a service, `caddy`, `edge` or `pggateway`), replaced on
each restart and absent while the process is down; `<data_dir>/run.pids` lists them all.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import grpc
import httpx
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs import keys
from libs.caddy import bootstrap_config
from libs.embedded_pg import EmbeddedPostgres
from libs.settings import SERVICES, Settings
from libs.supervision import FAILED, RESTARTING, write_status

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY_FILE = "admin-api-key"
PIDS_FILE = "run.pids"
RUN_DIR = "run"
# The processes after the services, with their modules; the launcher starts them in this order.
FRONTS = (("edge", "gateway.main"), ("pggateway", "pggateway.main"))
CADDY = "caddy"


def caddy_binary() -> str:
    """Debian's `caddy`, installed by scripts/install-system-deps.sh when missing."""
    found = shutil.which("caddy")
    if found is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "install-system-deps.sh"), "caddy"], check=True)
        found = shutil.which("caddy") or "/usr/bin/caddy"
    return found


def _say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _ensure_database(pg: EmbeddedPostgres, name: str) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            pg.create_database(name)


async def _wait_grpc(target: str, deadline: float) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not become healthy")
            await asyncio.sleep(0.1)


def _wait_pg_gateway(host: str, port: int, deadline: float) -> None:
    """Until the PG Gateway answers an SSLRequest with 'S' and completes a TLS handshake."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only liveness here; clients verify against the CA
    while True:
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
                if sock.recv(1) == b"S":
                    with ctx.wrap_socket(sock):
                        return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the PG Gateway on {host}:{port} did not accept TLS")
        time.sleep(0.1)


async def _wait_http(url: str, deadline: float) -> None:
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url, timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not become healthy")
            await asyncio.sleep(0.1)


class RestartPolicy:
    """When to start a dead process again: exponential backoff, and a cap on restarts per window
    so a process that cannot stay up is given up on instead of restarted forever."""

    def __init__(self, backoff: float, backoff_max: float, limit: int, window: float):
        self.backoff, self.backoff_max, self.limit, self.window = backoff, backoff_max, limit, window
        self.restarts: deque[float] = deque()

    def on_exit(self, now: float) -> float | None:
        """The delay before the next start, or None when the process is to be left failed."""
        while self.restarts and self.restarts[0] <= now - self.window:
            self.restarts.popleft()
        if len(self.restarts) >= self.limit:
            return None
        delay = min(self.backoff * 2 ** len(self.restarts), self.backoff_max)
        self.restarts.append(now)
        return delay


class Launcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.modules: dict[str, str] = {}
        self.pg: EmbeddedPostgres | None = None
        s = settings
        self.policies = {
            name: RestartPolicy(
                s.restart_backoff.total_seconds(),
                s.restart_backoff_max.total_seconds(),
                s.restart_limit,
                s.restart_window.total_seconds(),
            )
            for name in (*SERVICES, *(n for n, _ in FRONTS), CADDY)
        }

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "gen"), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        env["CTRLMESH_DATA_DIR"] = str(self.settings.data_dir.resolve())
        if self.settings.database_url:
            env["CTRLMESH_DATABASE_URL"] = self.settings.database_url
        return env

    def _spawn(self, name: str, module: str) -> None:
        self.modules[name] = module
        self.procs[name] = p = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=self._env())
        _write_atomic(self._pid_file(name), f"{p.pid}\n")

    def _spawn_caddy(self) -> None:
        """Caddy with only its admin endpoint: the network service loads everything else through
        it. Its storage stays inside the data directory (it keeps no config there)."""
        s = self.settings
        home = (s.data_dir / "caddy").resolve()
        env = dict(self._env(), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"))
        self.modules[CADDY] = CADDY
        p = subprocess.Popen(
            [caddy_binary(), "run", "--config", "/dev/stdin"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
        )
        assert p.stdin is not None
        p.stdin.write(json.dumps(bootstrap_config(f"127.0.0.1:{s.ingress_admin_port}")).encode())
        p.stdin.close()
        self.procs[CADDY] = p
        _write_atomic(self._pid_file(CADDY), f"{p.pid}\n")

    def _respawn(self, name: str) -> None:
        if name == CADDY:
            self._spawn_caddy()
        else:
            self._spawn(name, self.modules[name])

    def _pid_file(self, name: str) -> Path:
        return self.settings.data_dir / RUN_DIR / f"{name}.pid"

    def _write_pids(self) -> None:
        pids = [str(p.pid) for p in self.procs.values() if p.poll() is None]
        if self.pg is not None and self.pg.pid:
            pids.append(str(self.pg.pid))
        _write_atomic(self.settings.data_dir / PIDS_FILE, "\n".join(pids) + "\n")

    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        if not s.database_url:
            self.pg = EmbeddedPostgres(s.data_dir / "pg", port=s.embedded_pg_port)
            self.pg.start()
            _ensure_database(self.pg, "ctrlmesh")
            s.database_url = self.pg.url_for("ctrlmesh")
        # Made once here so the processes do not race to create them.
        keys.internal_secret(s)
        keys.keyring(s)
        key_file = s.data_dir / ADMIN_KEY_FILE
        key_existed = key_file.exists()
        # A status left by an earlier run would name processes that are starting afresh.
        write_status(s.data_dir, {})
        if not s.ingress_admin_url:
            self._spawn_caddy()
        for name in SERVICES:
            self._spawn(name, f"services.{name}.main")
        self._write_pids()
        deadline = time.monotonic() + s.start_timeout.total_seconds()
        asyncio.run(self._wait_services(deadline))
        if CADDY in self.procs:
            asyncio.run(_wait_http(f"{s.ingress_admin()}/config/", deadline))
        self._spawn(*FRONTS[0])
        self._write_pids()
        asyncio.run(_wait_http(f"http://{s.http_host}:{s.http_port}/health", deadline))
        self._spawn(*FRONTS[1])
        self._write_pids()
        _wait_pg_gateway(s.pg_host, s.pg_port, deadline)
        base = f"http://{s.http_host}:{s.http_port}"
        _say("ctrlmesh is up")
        _say(f"  HTTP API (edge):   {base}   (OpenAPI: {base}/openapi.json, health: {base}/health)")
        for name in SERVICES:
            _say(f"  gRPC {name + ':':<12} {s.service_target(name)}")
        _say(
            f"  Ingress (Caddy):  http://<instance>.<tenant>.{s.ingress_domain}:{s.ingress_http_port}"
            f"   (HTTPS :{s.ingress_https_port}, admin {s.ingress_admin()}"
            + (", external)" if s.ingress_admin_url else ")")
        )
        _say(
            f"  OTLP for instances: grpc://{s.otlp_host}:{s.otlp_grpc_port}, http://{s.otlp_host}:{s.otlp_http_port}"
        )
        ca = "operator-supplied" if s.pg_tls_cert else str(s.data_dir.resolve() / "pggateway" / "ca.crt")
        _say(f"  PG Gateway: postgres://{s.public_pg_host}:{s.pg_port} (TLS; CA: {ca})")
        _say(f"  data directory:   {s.data_dir.resolve()}")
        if self.pg is not None:
            _say(f"  PostgreSQL:       embedded, {self.pg.dsn_for('ctrlmesh').split('@')[-1]}")
        if s.bootstrap_admin_key:
            _say("  admin API key:    the value of CTRLMESH_BOOTSTRAP_ADMIN_KEY")
        elif not key_existed and key_file.exists():
            _say(f"  admin API key:    {key_file.read_text().strip()}   (shown once; also in {key_file})")
        else:
            _say(f"  admin API key:    in {key_file}")
        _say("Press Ctrl-C to stop.")

    async def _wait_services(self, deadline: float) -> None:
        await asyncio.gather(*(_wait_grpc(self.settings.service_target(n), deadline) for n in SERVICES))

    def _serving(self, name: str) -> bool:
        """One quick probe: does the (re)started process answer yet?"""
        s = self.settings
        try:
            if name == "edge":
                # Any answer will do: /health is 503 while another process is still down.
                httpx.get(f"http://{s.http_host}:{s.http_port}/health", timeout=0.5)
                return True
            if name == "pggateway":
                _wait_pg_gateway(s.pg_host, s.pg_port, time.monotonic())
                return True
            if name == CADDY:
                return httpx.get(f"{s.ingress_admin()}/config/", timeout=0.5).status_code == 200
            with grpc.insecure_channel(s.service_target(name)) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                return bool(r.status == health_pb2.HealthCheckResponse.SERVING)
        except (httpx.HTTPError, TimeoutError, grpc.RpcError):
            return False

    def wait(self) -> int:
        """Supervise the children until SIGINT or SIGTERM; returns the exit code."""
        stop = {"sig": 0}

        def on_signal(signum: int, _frame: object) -> None:
            stop["sig"] = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        restart_at: dict[str, float] = {}  # name → when to start it again
        down_since: dict[str, float] = {}  # name → when it exited, until it serves again
        failed: set[str] = set()
        published: dict[str, str] = {}
        while not stop["sig"]:
            states = {n: RESTARTING for n in (*restart_at, *down_since)} | {n: FAILED for n in failed}
            if states != published:
                write_status(self.settings.data_dir, states)
                published = states
            now = time.monotonic()
            for name, p in self.procs.items():
                if name in restart_at or name in failed or p.poll() is None:
                    continue
                self._pid_file(name).unlink(missing_ok=True)
                self._write_pids()
                down_since.setdefault(name, now)
                delay = self.policies[name].on_exit(now)
                if delay is None:
                    failed.add(name)
                    down_since.pop(name, None)
                    pol = self.policies[name]
                    _say(
                        f"{name} FAILED: pid {p.pid} exited with code {p.returncode}, after {pol.limit} "
                        f"restarts within {pol.window:g} s; not restarting it (the rest keeps serving)"
                    )
                    continue
                restart_at[name] = now + delay
                _say(f"{name} (pid {p.pid}) exited with code {p.returncode}; restarting it in {delay:g} s")
            for name, at in list(restart_at.items()):
                if at <= now and not stop["sig"]:
                    del restart_at[name]
                    self._respawn(name)
                    self._write_pids()
                    _say(f"{name} restarted (pid {self.procs[name].pid})")
            for name, since in list(down_since.items()):
                if name not in restart_at and self.procs[name].poll() is None and self._serving(name):
                    del down_since[name]
                    pid = self.procs[name].pid
                    _say(
                        f"{name} is serving again (pid {pid}), {time.monotonic() - since:.1f} s after it exited"
                    )
            time.sleep(0.1)
        return 0

    def stop(self) -> None:
        # The PG Gateway first, while the databases service can still take its lease releases.
        pg_gateway = self.procs.get("pggateway")
        if pg_gateway is not None and pg_gateway.poll() is None:
            pg_gateway.send_signal(signal.SIGTERM)
            try:
                pg_gateway.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pg_gateway.kill()
                pg_gateway.wait()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for name in self.procs:
            self._pid_file(name).unlink(missing_ok=True)
        if self.pg is not None:
            self.pg.stop()


def _write_atomic(path: Path, text: str) -> None:
    """Readers (tests, operators' scripts) never see a half-written pid file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # A SIGTERM while still starting unwinds like Ctrl-C, so `finally` stops what already runs.
    signal.signal(signal.SIGTERM, _interrupt)
    launcher = Launcher(Settings.load())
    code = 1
    try:
        launcher.start()
        code = launcher.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        # A second Ctrl-C must not abandon children half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        launcher.stop()
        _say("ctrlmesh stopped")
    sys.exit(code)


if __name__ == "__main__":
    main()
