"""The `local` compute driver: one PostgreSQL server process per running database, on this machine.

Each database has its own data directory under `<data_dir>/computes/<db_id>` (or, when the
unprivileged `ctrlmesh-pg` user cannot traverse the data directory, under
`/var/lib/ctrlmesh-pg/computes-<hash>/<db_id>`, recorded in `<data_dir>/COMPUTES_LOCATION`),
owned by `ctrlmesh-pg`, which also runs the server (PostgreSQL refuses root).

- prepare (at database create, never on the wake path): initdb, a pg_hba that admits only
  SCRAM over TCP from 127.0.0.1, then one short start to create the tenant's role (its password
  is the tenant's SCRAM verifier) and the database it owns.
- start: `postgres` spawned directly in its own session (no `pg_ctl -w`, which polls every
  100 ms); readiness is read from postmaster.pid's status line every 2 ms, so a clean start is
  ready in ~20 ms. A server already running on the data directory (this service restarted) is
  adopted, never duplicated: PostgreSQL's own postmaster.pid lock makes a second one impossible.
- stop: SIGINT (fast shutdown: a checkpoint, so the next start needs no recovery); SIGKILL of
  the whole process group when it does not finish in time.

Children drop to `ctrlmesh-pg` through `setpriv` rather than Popen(user=…): Popen must fork()
(not vfork) to switch users, and gRPC's fork handlers then restart its event-engine threads in
the child, which crash it (SIGSEGV) before exec. Without user arguments Popen uses vfork and no
fork handler runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

# embedded_pg's user and locations, so computes and the embedded control-plane database agree
# on who owns PostgreSQL data and where it may live.
from libs.embedded_pg import (
    FALLBACK_ROOT,
    PASSWORD_FILE,
    PG_OS_USER,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    _ensure_os_user,
    _pid_alive,
)
from services.databases.compute.base import ComputeError, ComputeSpec, Endpoint
from services.databases.compute.cgroups import Cgroups, Limits
from services.databases.compute.profiles import PROFILES, Profile

log = logging.getLogger("ctrlmesh.databases.local")

SUPERUSER = "ctrlmesh_admin"
LOCATION_FILE = "COMPUTES_LOCATION"
# SHA-256 of the verifier last set on the tenant's role (lets a boot skip waiting for it).
VERIFIER_FILE = "ctrlmesh-role-verifier.sha256"
# Only SCRAM over TCP from the loopback address: no Unix socket, no trust, no other host.
PG_HBA = (
    "# ctrlmesh local compute: SCRAM-SHA-256 over TCP from 127.0.0.1 only.\n"
    "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
    "host    all       all   127.0.0.1/32  scram-sha-256\n"
)
READY_POLL = 0.002
START_TIMEOUT = 60.0  # crash recovery of a busy writer may replay a lot of WAL
STOP_TIMEOUT = 30.0
# Errors in the server log after which a start is retried rather than failed.
_PORT_TAKEN = ("could not bind", "Address already in use")
_OLD_SHMEM = ("pre-existing shared memory block",)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _as_user(cmd: list[str], ids: tuple[int, int] | None) -> list[str]:
    """`cmd` run as the unprivileged user (see the module docstring for why not Popen(user=))."""
    if ids is None:
        return cmd
    return ["setpriv", f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups", "--", *cmd]


def _can_traverse(path: Path, ids: tuple[int, int]) -> bool:
    """`test -x` as the unprivileged user: honours every ancestor and ACLs."""
    return subprocess.run(_as_user(["test", "-x", str(path)], ids), cwd="/").returncode == 0


def _fingerprint(verifier: str) -> str:
    return hashlib.sha256(verifier.encode()).hexdigest()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _kill_writers(cluster: Path) -> None:
    """SIGKILL what still works on `cluster` by name (an initdb whose service was killed -9 goes on
    writing into the directory a retried prepare must empty), and wait for it to be gone."""
    target = str(cluster)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace") == target for a in argv):
            pids.append(int(entry.name))
    for pid in pids:
        log.warning("killing process %d left working on %s", pid, target)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class _Server(EmbeddedPostgres):
    """EmbeddedPostgres at a location we chose, with start split into spawn and an async wait.

    Setting the cluster directory and OS ids up front skips EmbeddedPostgres._prepare, whose
    traversal probe spawns a process: too slow for the wake path and the crash monitor.
    """

    def __init__(self, cluster: Path, port: int, ids: tuple[int, int] | None, settings: dict[str, str]):
        super().__init__(cluster, port=port, user=SUPERUSER, settings=settings)
        self._cluster_dir = cluster
        self._ids = ids
        # Wraps the server's command (its cgroup); identity when limits are not enforced.
        self.wrap: Callable[[list[str]], list[str]] = lambda cmd: cmd

    def initialize(self) -> None:
        """A fresh cluster: whatever a previous attempt left is removed first."""
        assert self._cluster_dir is not None
        _kill_writers(self._cluster_dir)
        for _ in range(100):
            shutil.rmtree(self._cluster_dir, ignore_errors=True)
            try:
                self._cluster_dir.mkdir(mode=0o700, parents=True)
                break
            except FileExistsError:
                # An initdb orphaned by a killed service may still be writing into it (chaos CI:
                # "File exists" at the retried prepare): wait for it to finish, then empty it again.
                time.sleep(0.1)
        else:
            raise EmbeddedPostgresError(f"{self._cluster_dir} could not be emptied for a fresh cluster")
        if self._ids is not None:
            os.chown(self._cluster_dir, *self._ids)
        password = secrets.token_urlsafe(24)
        # initdb wants an empty directory: the password file lives outside it until done.
        fd, tmp = tempfile.mkstemp(prefix="ctrlmesh-pwfile-")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
            if self._ids is not None:
                os.chown(tmp, *self._ids)
            cmd = [
                str(self.bindir / "initdb"),
                "-D",
                str(self._cluster_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={tmp}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
            ]
            res = subprocess.run(
                _as_user(cmd, self._ids), capture_output=True, text=True, cwd=self._cluster_dir, timeout=300
            )
        finally:
            os.unlink(tmp)
        if res.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        for name, text in ((PASSWORD_FILE, password + "\n"), ("pg_hba.conf", PG_HBA)):
            with os.fdopen(self._private_file(self._cluster_dir / name, os.O_TRUNC), "w") as fh:
                fh.write(text)
        self._password = password

    def spawn(self) -> int:
        """Start `postgres` in its own session (a Ctrl-C aimed at us must not reach it) and return
        at once; the caller waits for readiness. TCP only: no socket directory is made."""
        cmd = [str(self.bindir / "postgres"), "-D", str(self.cluster_dir), "-p", str(self.port)]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        log_fd = self._private_file(self.log_path, os.O_APPEND)
        try:
            self._proc = subprocess.Popen(
                self.wrap(_as_user(cmd, self._ids)),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=self.cluster_dir,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        self._pid, self._owned = self._proc.pid, True
        return self._pid

    def status(self) -> str:
        """postmaster.pid's status line ("starting", "ready", "stopping"), "" before it exists."""
        try:
            lines = (self.cluster_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return ""
        return lines[7].strip() if len(lines) > 7 else ""

    def live(self) -> tuple[int, int] | None:
        """(pid, port) of a live postmaster on this cluster, or None."""
        return self._live_postmaster()

    def adopt(self, pid: int) -> None:
        self._pid = pid

    def alive(self) -> bool:
        if self._pid is not None and self._alive(self._pid):
            return True
        return self._live_postmaster() is not None

    def private_file(self, path: Path) -> int:
        return self._private_file(path, os.O_TRUNC)

    def exit_status(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def tail(self) -> str:
        return self._log_tail()

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        """As EmbeddedPostgres's, at READY_POLL instead of 50 ms: a handoff's clients wait on it."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            elif not _pid_alive(pid):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(READY_POLL)


class LocalDriver:
    """The `local` ComputeDriver (see compute/base.py)."""

    name = "local"
    stop_on_shutdown = True

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        *,
        extra_settings: dict[str, dict[str, str]] | None = None,
        cgroups: Cgroups | None = None,
    ):
        self._data_dir = Path(data_dir).absolute()
        self._host = host
        self._extra = extra_settings or {}
        self.cgroups = cgroups or Cgroups()
        self._root: Path | None = None
        self._ids: tuple[int, int] | None = None
        self._servers: dict[str, _Server] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- locations ---------------------------------------------------------------------------

    def root(self) -> Path:
        """Where the data directories live; chosen once (see the module docstring)."""
        if self._root is not None:
            return self._root
        self._data_dir.mkdir(parents=True, exist_ok=True)
        root = self._data_dir / "computes"
        if os.geteuid() == 0:
            self._ids = _ensure_os_user()
            if not _can_traverse(self._data_dir, self._ids):
                digest = hashlib.sha256(str(self._data_dir).encode()).hexdigest()[:12]
                root = FALLBACK_ROOT / f"computes-{digest}"
                (self._data_dir / LOCATION_FILE).write_text(f"{root}\n")
                log.info("%s not traversable by %s; computes live in %s", self._data_dir, PG_OS_USER, root)
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._root = root
        return root

    def data_path(self, spec: ComputeSpec) -> Path:
        return self.root() / spec.db_id

    def _server(self, spec: ComputeSpec, port: int = 0, profile: Profile | None = None) -> _Server:
        prof = profile or PROFILES["L1"]
        settings = prof.settings()
        settings.update(self._extra.get(prof.name, {}))
        settings["listen_addresses"] = self._host
        return _Server(self.data_path(spec), port, self._ids, settings)

    def _lock(self, db_id: str) -> asyncio.Lock:
        return self._locks.setdefault(db_id, asyncio.Lock())

    # -- the driver --------------------------------------------------------------------------

    async def prepare(self, spec: ComputeSpec, role_verifier: str) -> None:
        async with self._lock(spec.db_id):
            await asyncio.to_thread(self.root)
            self._servers.pop(spec.db_id, None)
            server = self._server(spec)
            live = await asyncio.to_thread(server.live)
            if live is not None:  # a half-made prepare left its server running
                server.adopt(live[0])
                await asyncio.to_thread(server.stop, "immediate", 10)
            try:
                await asyncio.to_thread(server.initialize)
            except EmbeddedPostgresError as err:
                raise ComputeError(f"initdb failed for {spec.db_id}: {err}") from err
            server = await self._spawn_ready(spec, PROFILES["L1"])
            try:
                conn = await self._admin(server)
                try:
                    await conn.execute(
                        f"CREATE ROLE {_quote_ident(spec.role)} LOGIN PASSWORD {_quote_literal(role_verifier)}"
                    )
                    await conn.execute(
                        f"CREATE DATABASE {_quote_ident(spec.db_name)} OWNER {_quote_ident(spec.role)}"
                    )
                finally:
                    await conn.close()
                with os.fdopen(server.private_file(server.cluster_dir / VERIFIER_FILE), "w") as fh:
                    fh.write(_fingerprint(role_verifier) + "\n")
            finally:
                await asyncio.to_thread(server.stop, "fast", STOP_TIMEOUT)
                self._servers.pop(spec.db_id, None)
                await asyncio.to_thread(self._remove_groups, spec.db_id)

    async def start(self, spec: ComputeSpec, profile: Profile) -> Endpoint:
        async with self._lock(spec.db_id):
            await asyncio.to_thread(self.root)
            t0 = time.monotonic()
            server = self._servers.get(spec.db_id)
            if server is None or not server.alive():
                server = self._server(spec)
                live = await asyncio.to_thread(server.live)
                if live is not None:
                    log.info("adopting running compute of %s (pid %d, port %d)", spec.db_id, *live)
                    server = self._server(spec, live[1], profile)
                    server.adopt(live[0])
                    await self._wait_ready(server, time.monotonic() + START_TIMEOUT)
                    self._servers[spec.db_id] = server
                else:
                    server = await self._spawn_ready(spec, profile)
            return Endpoint(
                host=self._host,
                port=server.port,
                worker_id=f"local-{spec.db_id[:8]}-g{spec.generation}",
                boot_seconds=time.monotonic() - t0,
            )

    async def stop(self, spec: ComputeSpec) -> None:
        async with self._lock(spec.db_id):
            server = self._servers.pop(spec.db_id, None) or self._server(spec)
            if server.live() is None and not server.alive():
                # Nothing runs: only the cgroups of earlier generations may be left.
                await asyncio.to_thread(self._remove_groups, spec.db_id)
                return
            try:
                await asyncio.to_thread(server.stop, "fast", STOP_TIMEOUT)
            except EmbeddedPostgresError as err:
                raise ComputeError(f"could not stop the compute of {spec.db_id}: {err}") from err
            await asyncio.to_thread(self._remove_groups, spec.db_id)

    async def checkpoint(self, spec: ComputeSpec) -> None:
        server = self._servers.get(spec.db_id)
        if server is None or not server.alive():
            live = await asyncio.to_thread(self._server(spec).live)
            if live is None:
                raise ComputeError(f"the compute of {spec.db_id} is not running")
            server = self._server(spec, live[1])
        conn = await self._admin(server)
        try:
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def prepare_candidate(self, spec: ComputeSpec, profile: Profile) -> None:
        await asyncio.to_thread(self.cgroups.make, self.group(spec), profile)

    def limits(self) -> Limits:
        return self.cgroups.status()

    def group(self, spec: ComputeSpec) -> str:
        """The cgroup of a writer generation."""
        return f"{spec.db_id}-g{spec.generation}"

    async def cpu_seconds(self, spec: ComputeSpec) -> float | None:
        return await asyncio.to_thread(self.cgroups.cpu_seconds, self.group(spec))

    def _remove_groups(self, db_id: str) -> None:
        for group in self.cgroups.groups(db_id):
            self.cgroups.remove(group)

    async def is_alive(self, spec: ComputeSpec) -> bool:
        server = self._servers.get(spec.db_id)
        if server is not None:
            return server.alive()
        if self._root is None:
            await asyncio.to_thread(self.root)
        return self._server(spec).live() is not None

    async def set_role_verifier(self, spec: ComputeSpec, role_verifier: str) -> None:
        server = self._servers.get(spec.db_id)
        if server is None:
            live = await asyncio.to_thread(self._server(spec).live)
            if live is None:
                raise ComputeError(f"the compute of {spec.db_id} is not running")
            server = self._server(spec, live[1])
        await self._set_verifier(server, spec.role, role_verifier)

    async def role_verifier_applied(self, spec: ComputeSpec, role_verifier: str) -> bool:
        path = self.data_path(spec) / VERIFIER_FILE
        try:
            return path.read_text().strip() == _fingerprint(role_verifier)
        except OSError:
            return False

    async def destroy(self, spec: ComputeSpec) -> None:
        async with self._lock(spec.db_id):
            await asyncio.to_thread(self.root)
            server = self._servers.pop(spec.db_id, None) or self._server(spec)
            await asyncio.to_thread(server.stop, "immediate", 10)
            await asyncio.to_thread(self._remove_groups, spec.db_id)
            await asyncio.to_thread(shutil.rmtree, self.data_path(spec), True)
        self._locks.pop(spec.db_id, None)

    async def storage_bytes(self, spec: ComputeSpec) -> int:
        def walk() -> int:
            total = 0
            for dirpath, _, files in os.walk(self.data_path(spec)):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        pass
            return total

        await asyncio.to_thread(self.root)
        return await asyncio.to_thread(walk)

    async def shutdown(self) -> None:
        """Stop every compute this driver started or adopted (a clean service stop)."""
        specs = list(self._servers)
        await asyncio.gather(
            *(asyncio.to_thread(self._servers[d].stop, "fast", 10) for d in specs), return_exceptions=True
        )
        self._servers.clear()

    def known(self) -> list[str]:
        """Database ids with a compute this process started or adopted."""
        return list(self._servers)

    # -- internals ---------------------------------------------------------------------------

    async def _spawn_ready(self, spec: ComputeSpec, profile: Profile) -> _Server:
        """Spawn on a fresh port and wait for `ready`; retry on a taken port or on the shared
        memory a SIGKILLed predecessor's backends still hold for a moment."""
        deadline = time.monotonic() + START_TIMEOUT
        group = self.group(spec)
        try:
            await asyncio.to_thread(self.cgroups.make, group, profile)
        except OSError as err:
            raise ComputeError(f"could not make the cgroup of {spec.db_id}: {err}") from err
        while True:
            server = self._server(spec, _free_port(self._host), profile)
            server.wrap = lambda cmd: self.cgroups.wrap(group, cmd)
            await asyncio.to_thread(server.spawn)
            self._servers[spec.db_id] = server
            try:
                await self._wait_ready(server, deadline)
                return server
            except ComputeError as err:
                self._servers.pop(spec.db_id, None)
                text = str(err)
                retry = any(m in text for m in _PORT_TAKEN + _OLD_SHMEM)
                if not retry or time.monotonic() > deadline:
                    raise
                log.info("compute of %s did not start (%s); retrying", spec.db_id, text.splitlines()[0])
                await asyncio.sleep(0.05)

    async def _wait_ready(self, server: _Server, deadline: float) -> None:
        while True:
            if server.status() == "ready":
                return
            if not server.alive():
                raise ComputeError(
                    f"postgres exited during startup (status {server.exit_status()}); log tail:\n{server.tail()}"
                )
            if time.monotonic() > deadline:
                await asyncio.to_thread(server.stop, "immediate", 10)
                raise ComputeError(f"postgres not ready in time; log tail:\n{server.tail()}")
            await asyncio.sleep(READY_POLL)

    async def _admin(self, server: _Server) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=self._host,
            port=server.port,
            user=SUPERUSER,
            password=server.password,
            database="postgres",
            timeout=10,
        )

    async def _set_verifier(self, server: _Server, role: str, verifier: str) -> None:
        conn = await self._admin(server)
        try:
            await conn.execute(f"ALTER ROLE {_quote_ident(role)} PASSWORD {_quote_literal(verifier)}")
        finally:
            await conn.close()
        fd = server.private_file(server.cluster_dir / VERIFIER_FILE)
        with os.fdopen(fd, "w") as fh:
            fh.write(_fingerprint(verifier) + "\n")
