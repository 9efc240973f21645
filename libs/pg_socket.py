"""The PG Gateway's Unix socket, shared by the gateway (which listens on it), the docker provider
(which mounts its directory into bound containers) and the clusters service (whose bindings name
it): one place for the names both sides must agree on.

libpq finds a server's socket as `<directory>/.s.PGSQL.<port>`, so `PGHOST` names the directory
and `PGPORT` the port. Over the socket there is no TLS (libpq never asks for it on a Unix
socket); the gateway still authenticates with SCRAM, and the file's permissions and who gets
the mount are the boundary.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from pathlib import Path

# Where a bound container sees the gateway's socket directory (PGHOST names it).
CONTAINER_DIR = "/run/ctrlmesh/pg"
# AF_UNIX paths are limited to 108 bytes, the terminating NUL included.
MAX_PATH = 107


def socket_name(port: int) -> str:
    return f".s.PGSQL.{port}"


def socket_path(directory: Path, port: int) -> Path:
    return directory / socket_name(port)


def wants_mount(env: dict[str, str]) -> bool:
    """A container whose injected PGHOST names the mount point gets the socket directory: the
    binding's secrets are the request (see services/clusters/managed.py)."""
    return env.get("PGHOST") == CONTAINER_DIR


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind(directory: Path, port: int, backlog: int = 1024, wait: float = 10.0) -> socket.socket:
    """A listening Unix socket at `<directory>/.s.PGSQL.<port>`, mode 0777 (PostgreSQL's
    unix_socket_permissions default: authentication decides, not the file).

    A socket file left by a process that is gone is replaced. One that still answers is waited
    for up to `wait` seconds (the workers of a killed gateway finish their clients first), then
    OSError: another gateway serves it."""
    path = socket_path(directory, port)
    if len(str(path)) > MAX_PATH:
        raise OSError(
            f"the PG socket path {path} is longer than {MAX_PATH} bytes; set CTRLMESH_PG_SOCKET_DIR"
        )
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        deadline = time.monotonic() + wait
        while _answers(path):
            if time.monotonic() > deadline:
                raise OSError(f"another server listens on {path}")
            time.sleep(0.2)
        path.unlink(missing_ok=True)  # stale: nobody listens
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o777)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def unlink(directory: Path, port: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        socket_path(directory, port).unlink()
