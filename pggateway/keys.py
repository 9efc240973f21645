"""The BackendKeyData the gateway gives its clients: a process id that is no process, and a key.

A client of a pooler has no backend of its own, so the (pid, secret) pair the gateway sends at
login is its own, used only to route a CancelRequest back to the session. What that means for
a client:

- `backend_pid` (libpq's PQbackendPID, psycopg's `conn.info.backend_pid`, asyncpg's
  `get_server_pid()`) is the gateway's id for the *client session*, between 2^22 and 2^31. It
  stays the same for the whole session, and a CancelRequest with it and the secret cancels what
  that session is running, on whichever backend runs it.
- `pg_backend_pid()` is the PostgreSQL backend serving the *current transaction*; under
  transaction pooling it can change between transactions (a pinned session keeps one backend).
  It never equals `backend_pid`, and `pg_stat_activity` has rows only for backend pids.
- The pid in a NOTIFY (`Notify.pid`, asyncpg's listener callback) is the notifying *backend's*
  pid, so it is comparable with `pg_backend_pid()`, not with `backend_pid`. LISTEN pins the
  session, so its backend (and that pid) stays put while it listens.
- `pg_terminate_backend(backend_pid)` and `pg_cancel_backend(backend_pid)` name no process and
  return false with a warning: Linux never issues a pid at or above its largest `pid_max`
  (2^22, `PID_MAX_LIMIT`), so a gateway id can never hit another client's backend. To stop your
  own query use the driver's cancel; to end a backend, `pg_terminate_backend(pg_backend_pid())`
  ends the one serving you (the gateway then drops that backend alone and you get PostgreSQL's
  FATAL 57P01, as directly).

The low byte of the pid names the gateway worker process that owns the session, so that a
CancelRequest, which the kernel may hand to any worker sharing the port, can be passed on to
the right one. The secret is 31 random bits (positive, since drivers read it as an int32).
"""

from __future__ import annotations

import secrets

# Linux's PID_MAX_LIMIT on 64-bit: pid_max cannot be set higher, so no process has a pid >= this.
LINUX_PID_MAX_LIMIT = 1 << 22
MAX_WORKERS = 256
_WORKER_BITS = 8
# Session ids are (r << 8) | worker with r in [_R_MIN, _R_END): every id lies in [2^22 + 256, 2^31).
_R_MIN = (LINUX_PID_MAX_LIMIT >> _WORKER_BITS) + 1
_R_END = 1 << (31 - _WORKER_BITS)


def new_key(worker: int = 0) -> tuple[int, int]:
    """A fresh (pid, secret) for a session of `worker`."""
    if not 0 <= worker < MAX_WORKERS:
        raise ValueError(f"worker index {worker} out of range")
    r = _R_MIN + secrets.randbelow(_R_END - _R_MIN)
    return (r << _WORKER_BITS) | worker, secrets.randbits(31)


def key_worker(pid: int) -> int | None:
    """The worker that issued `pid`, or None when no gateway could have issued it."""
    if not LINUX_PID_MAX_LIMIT <= pid < 1 << 31:
        return None
    return pid & (MAX_WORKERS - 1)
