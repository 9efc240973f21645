"""Embedded PostgreSQL server for ctrlmesh tests and single-node deployments.

We drive the ``initdb`` and ``postgres`` binaries directly instead of ``pg_ctl`` or
pgserver's own server management, so that we own the process (pid, session,
signals, log file) and can reason about its lifecycle.

Running as root: PostgreSQL refuses to run as root, so initdb and postgres run as the
unprivileged system user ``ctrlmesh-pg`` (created on demand). That user must be able to
traverse every parent directory of ``data_dir``. If it cannot (e.g. pytest's
``/tmp/pytest-of-root`` is mode 0700), the cluster lives in
``/var/lib/ctrlmesh-pg/<sha256(data_dir)[:16]>`` instead and ``data_dir/CLUSTER_LOCATION``
records where. We never chmod the caller's directories. ``cluster_dir`` always tells
where the cluster actually is; the log file and password file live there too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

PG_OS_USER = "ctrlmesh-pg"
FALLBACK_ROOT = Path("/var/lib/ctrlmesh-pg")
PASSWORD_FILE = ".pgpass-ctrlmesh"  # the superuser password, one line, mode 0600
LOG_FILE = "postgres.log"
SOCKET_SUBDIR = "sockets"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes incl. "/.s.PGSQL.<port>" and NUL
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


class EmbeddedPostgresError(RuntimeError):
    """Raised when the embedded server cannot be located, initialised, started or stopped."""


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / exe, os.X_OK) for exe in ("postgres", "initdb"))


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in name.split("."))
    except ValueError:
        return (-1,)


def find_pg_bindir() -> Path:
    """Return a directory containing ``postgres`` and ``initdb``.

    Order: ``$CTRLMESH_PG_BINDIR``, the pgserver wheel's ``pginstall/bin`` (located via
    find_spec, so pgserver's own code is never executed), ``pg_config --bindir``, then the
    highest ``/usr/lib/postgresql/*/bin``. An explicitly configured but broken
    ``CTRLMESH_PG_BINDIR`` is an error rather than silently falling back, because a
    different major version would refuse an existing cluster anyway.
    """
    explicit = os.environ.get("CTRLMESH_PG_BINDIR")
    if explicit:
        if _has_server_binaries(Path(explicit)):
            return Path(explicit)
        raise EmbeddedPostgresError(f"CTRLMESH_PG_BINDIR={explicit} has no executable postgres and initdb")
    candidates: list[Path] = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            res = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out := res.stdout.strip():
                candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError) as exc:
            logger.debug("pg_config --bindir failed: %s", exc)
    distro = Path("/usr/lib/postgresql")
    if distro.is_dir():
        candidates += sorted(distro.glob("*/bin"), key=lambda p: _version_key(p.parent.name), reverse=True)
    for cand in candidates:
        if _has_server_binaries(cand):
            return cand
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries (postgres + initdb) found; install pgserver, "
        f"set CTRLMESH_PG_BINDIR, or install PostgreSQL. Tried: {[str(c) for c in candidates]}"
    )


def _ensure_os_user() -> tuple[int, int]:
    """Create the unprivileged ``ctrlmesh-pg`` user if needed; return (uid, gid)."""
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    cmd = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER]
    error = ""
    for attempt in range(6):  # retry: parallel test workers race on /etc/passwd's lock
        try:
            pw = pwd.getpwnam(PG_OS_USER)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            if attempt == 5:
                break
        time.sleep(0.2 * attempt)
        logger.info("creating system user %s", PG_OS_USER)
        res = subprocess.run(cmd, capture_output=True, text=True)
        error = res.stderr.strip()
    raise EmbeddedPostgresError(f"cannot create system user {PG_OS_USER}: {error}")


def _user_can_exec(path: Path, uid: int, gid: int) -> bool:
    """``test -x`` as the target user: honours every ancestor and ACLs, unlike a stat() walk."""
    res = subprocess.run(["test", "-x", str(path)], user=uid, group=gid, extra_groups=[], cwd="/")
    return res.returncode == 0


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie answers kill(pid, 0) too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (non-Linux) or raced with exit: trust kill(0)


def _is_postgres(pid: int) -> bool:
    """Guard against pid reuse: a stale postmaster.pid may name an unrelated live process."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("postgres")
    except OSError:
        return True


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``data_dir`` served on ``host:port``, owned by this object.

    ``start()`` is idempotent across processes: if a live postmaster already serves the
    cluster on the same port it is adopted, not duplicated. The server runs in its own
    session so a terminal Ctrl-C aimed at the parent does not kill it; ``stop()`` (or
    leaving the ``with`` block, for a server this instance launched) does.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        host: str = "127.0.0.1",
        user: str = "ctrlmesh",
        password: str | None = None,
        settings: dict[str, str] | None = None,
        *,
        bindir: Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port, self.host, self.user = port, host, user
        self.settings: dict[str, str] = dict(settings or {})
        self.startup_timeout = startup_timeout
        self._password = password
        self._bindir = bindir
        self._ids: tuple[int, int] | None = None  # (uid, gid) to drop to when root
        self._cluster_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._owned = False

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(cluster_dir={self._cluster_dir or self.data_dir}, {self.host}:{self.port})"

    # -- locations and credentials ------------------------------------------------------
    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    @property
    def cluster_dir(self) -> Path:
        """Where the cluster really lives (differs from data_dir only in the root fallback)."""
        if self._cluster_dir is None:
            self._prepare()
        assert self._cluster_dir is not None
        return self._cluster_dir

    @property
    def log_path(self) -> Path:
        return self.cluster_dir / LOG_FILE

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def password(self) -> str:
        if self._password is None:
            pwfile = self.cluster_dir / PASSWORD_FILE
            if not pwfile.exists():
                raise EmbeddedPostgresError(f"no password given and {pwfile} does not exist")
            self._password = pwfile.read_text().rstrip("\n")
        return self._password

    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{quote(self.user, safe='')}:{quote(self.password, safe='')}@{host}:{self.port}"

    def url_for(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{self._netloc()}/{quote(database, safe='')}"

    def dsn_for(self, database: str = "postgres") -> str:
        return f"postgresql://{self._netloc()}/{quote(database, safe='')}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL for the ``postgres`` database (asyncpg driver)."""
        return self.url_for()

    @property
    def dsn(self) -> str:
        """libpq/asyncpg DSN for the ``postgres`` database."""
        return self.dsn_for()

    def _prepare(self) -> None:
        """Pick the cluster directory and, as root, the OS user that will own it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self._cluster_dir = self.data_dir
            return
        uid, gid = self._ids = _ensure_os_user()
        cluster = self.data_dir
        if not _user_can_exec(self.data_dir.parent, uid, gid):
            FALLBACK_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
            cluster = FALLBACK_ROOT / hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            cluster.mkdir(mode=0o700, exist_ok=True)
            (self.data_dir / "CLUSTER_LOCATION").write_text(f"{cluster}\n")
            logger.info("%s not traversable by %s; cluster lives in %s", self.data_dir, PG_OS_USER, cluster)
        if cluster.stat().st_uid != uid:
            _chown_tree(cluster, uid, gid)
        if not _user_can_exec(self.bindir / "postgres", uid, gid):
            raise EmbeddedPostgresError(f"{self.bindir}/postgres is not executable by user {PG_OS_USER}")
        self._cluster_dir = cluster

    def _child_kwargs(self) -> dict[str, Any]:
        if self._ids is None:
            return {}
        return {"user": self._ids[0], "group": self._ids[1], "extra_groups": []}

    def _private_file(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags | os.O_WRONLY | os.O_CREAT, 0o600)
        if self._ids is not None:
            os.fchown(fd, *self._ids)
        return fd

    # -- lifecycle ----------------------------------------------------------------------
    def _read_pid_file(self) -> tuple[int, int] | None:
        try:
            lines = (self.cluster_dir / "postmaster.pid").read_text().splitlines()
            return int(lines[0]), int(lines[3]) if len(lines) > 3 else -1
        except (OSError, ValueError, IndexError):
            return None

    def _live_postmaster(self) -> tuple[int, int] | None:
        """(pid, port) of a live postmaster on this cluster; removes a stale pid file."""
        info = self._read_pid_file()
        if info is None:
            return None
        if self._alive(info[0]) and _is_postgres(info[0]):
            return info
        logger.warning("removing stale postmaster.pid (pid %d is gone or not postgres)", info[0])
        (self.cluster_dir / "postmaster.pid").unlink(missing_ok=True)
        return None

    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None  # also reaps our own child
        return _pid_alive(pid)

    def start(self, timeout: float | None = None) -> None:
        """Initialise if needed, start (or adopt) the server, and block until a login works."""
        timeout = self.startup_timeout if timeout is None else timeout
        live = self._live_postmaster()
        if live is not None:
            if live[1] != self.port:
                raise EmbeddedPostgresError(
                    f"{self.cluster_dir} is already served by pid {live[0]} on port {live[1]}"
                )
            logger.info("reusing running postgres pid %d on port %d", *live)
            self._pid = live[0]
            self._wait_ready(live[0], timeout)
            return
        if not (self.cluster_dir / "PG_VERSION").exists():
            self._initdb()
        self._spawn()
        assert self._pid is not None
        try:
            self._wait_ready(self._pid, timeout)
        except EmbeddedPostgresError:
            if self._alive(self._pid):
                self.stop("immediate", timeout=5)
            raise

    def _initdb(self) -> None:
        password = self._password or secrets.token_urlsafe(24)
        # initdb wants an empty directory, so the pwfile must live outside it until done.
        fd, tmp = tempfile.mkstemp(prefix="ctrlmesh-pwfile-", dir="/tmp" if self._ids else None)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
            if self._ids is not None:
                os.chown(tmp, *self._ids)
            cmd = [str(self.bindir / "initdb"), "-D", str(self.cluster_dir), "-U", self.user]
            cmd += [f"--pwfile={tmp}", "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"]
            if self.settings.get("fsync", "on").lower() in ("off", "false", "0", "no"):
                cmd.append("--no-sync")  # caller already opted out of durability
            logger.info("initdb %s", self.cluster_dir)
            t0 = time.monotonic()
            res = subprocess.run(
                cmd, capture_output=True, text=True, cwd=self.cluster_dir, timeout=300, **self._child_kwargs()
            )
            if res.returncode != 0:
                raise EmbeddedPostgresError(f"initdb failed ({res.returncode}):\n{res.stdout}{res.stderr}")
            logger.info("initdb done in %.2fs", time.monotonic() - t0)
        finally:
            os.unlink(tmp)
        with os.fdopen(self._private_file(self.cluster_dir / PASSWORD_FILE, os.O_TRUNC), "w") as fh:
            fh.write(password + "\n")
        self._password = password

    def _spawn(self) -> None:
        sockdir = self.cluster_dir / SOCKET_SUBDIR
        sockdir.mkdir(mode=0o700, exist_ok=True)
        if self._ids is not None:
            os.chown(sockdir, *self._ids)
        sock_arg = str(sockdir)
        if len(sock_arg) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH:
            logger.warning("socket path under %s too long; TCP only", sockdir)
            sock_arg = ""
        cmd = [str(self.bindir / "postgres"), "-D", str(self.cluster_dir), "-p", str(self.port)]
        cmd += ["-k", sock_arg, "-c", f"listen_addresses={self.host}"]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        log_fd = self._private_file(self.log_path, os.O_APPEND)
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=self.cluster_dir,
                start_new_session=True,
                **self._child_kwargs(),
            )
        finally:
            os.close(log_fd)
        self._pid, self._owned = self._proc.pid, True
        logger.info(
            "started postgres pid %d on %s:%d, log %s", self._pid, self.host, self.port, self.log_path
        )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"

    def _wait_ready(self, pid: int, timeout: float) -> None:
        """Poll TCP connect + a real login: a listening socket alone may still say 'starting up'."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if not self._alive(pid):
                raise EmbeddedPostgresError(
                    f"postgres pid {pid} exited during startup; log tail:\n{self._log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    pass
                with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError as exc:
                if "password authentication failed" in str(exc):
                    raise EmbeddedPostgresError(f"server up but login as {self.user} failed: {exc}") from exc
                last = exc
            except OSError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"postgres on {self.host}:{self.port} not ready after {timeout}s "
                    f"({last}); log tail:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server (smart=SIGTERM, fast=SIGINT, immediate=SIGQUIT), SIGKILL on timeout."""
        sig = _STOP_SIGNALS[mode]
        pid = self._pid if self._pid is not None and self._alive(self._pid) else None
        if pid is None:
            live = self._live_postmaster()
            pid = live[0] if live else None
        if pid is not None:
            logger.info("stopping postgres pid %d (%s)", pid, mode)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            if not self._wait_exit(pid, timeout):
                logger.warning("pid %d ignored %s stop for %.0fs; sending SIGKILL", pid, mode, timeout)
                try:  # start_new_session made it a group leader: kill its backends too
                    os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if not self._wait_exit(pid, 10):
                    raise EmbeddedPostgresError(f"postgres pid {pid} survived SIGKILL")
        self._proc, self._pid, self._owned = None, None, False

    def is_running(self) -> bool:
        if self._pid is not None and self._alive(self._pid):
            return True
        info = self._read_pid_file()
        return info is not None and self._alive(info[0]) and _is_postgres(info[0])

    def destroy(self) -> None:
        """Stop the server and delete the cluster; needed for the root fallback under /var/lib."""
        self.stop(mode="immediate")
        shutil.rmtree(self.cluster_dir, ignore_errors=True)
        (self.data_dir / "CLUSTER_LOCATION").unlink(missing_ok=True)
        self._cluster_dir = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._owned:  # an adopted server belongs to whoever launched it
            self.stop()

    # -- helpers for tests --------------------------------------------------------------
    def create_database(self, name: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
