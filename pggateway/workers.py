"""Several gateway processes on one port: the supervisor, and what each worker knows of the rest.

One Python process runs one event loop on one core, so `python -m pggateway.main` starts
CTRLMESH_PG_WORKERS workers (default: the number of CPUs) and supervises them. Every worker
binds the listening port itself with SO_REUSEPORT, and the kernel spreads new connections
across them. Nothing else is shared: each worker is a full gateway with its own routes, pools
and leases (its own holder id, so the databases service counts each worker's connections in its
own lease, and a database stops when none of them holds it), and its own metrics on
CTRLMESH_PG_METRICS_PORT + its index.

A CancelRequest arrives on a new connection, which the kernel may give to any worker. The
session's BackendKeyData pid names its worker (`pggateway.keys`), and a worker that receives a
cancel for another one passes the 16-byte packet on to that worker's private socket (an abstract
Unix socket named after the supervisor's run), which handles it as if it had received it: the
design of PgBouncer's `peer_id` / `[peers]`, with the peers found by name instead of configured.
The private socket accepts nothing a client could not send to the public port (the secret is
still checked by the owner), so it needs no authentication of its own.

The supervisor restarts a worker that exits, after a pause that doubles with each quick crash
(0.5 s up to 10 s); a worker that cannot stay up for RESTART_STABLE_SECONDS five times in a row
stops the whole gateway, so a broken configuration fails loudly instead of looping. SIGTERM or
SIGINT to the supervisor stops every worker gracefully (each tells its clients and releases its
leases). A worker whose supervisor died is sent SIGTERM by the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pggateway.keys import MAX_WORKERS

log = logging.getLogger("ctrlmesh.pggateway.workers")

RESTART_MIN_SECONDS = 0.5
RESTART_MAX_SECONDS = 10.0
RESTART_STABLE_SECONDS = 10.0
MAX_QUICK_CRASHES = 5
# Below the launcher's 10 s wait for the gateway, so a stuck worker is killed by us, not it.
STOP_TIMEOUT = 8.0
_POLL = 0.1


@dataclass(frozen=True)
class WorkerSlot:
    """A worker's place: its index among `count` workers of the supervisor's run `tag`."""

    index: int = 0
    count: int = 1
    tag: str = ""

    def peer_address(self, index: int) -> str:
        # Abstract namespace (leading NUL): no file to clean up after a crash.
        return f"\0ctrlmesh-pggateway-{self.tag}-{index}"

    def peers(self) -> tuple[str, ...]:
        """Every worker's cancel socket, by index; none when there is no other worker."""
        if self.count <= 1:
            return ()
        return tuple(self.peer_address(i) for i in range(self.count))

    def argv(self) -> list[str]:
        return ["--worker", str(self.index), "--worker-count", str(self.count), "--run-tag", self.tag]


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The supervisor → worker arguments (not for people: a worker is started by the supervisor)."""
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--run-tag", default="", help=argparse.SUPPRESS)


def slot_from_args(args: argparse.Namespace) -> WorkerSlot | None:
    """This process's slot when it is a worker; None for the supervisor."""
    if args.worker is None:
        return None
    return WorkerSlot(args.worker, args.worker_count, args.run_tag)


def worker_count(configured: int | None) -> int:
    count = configured if configured else (os.cpu_count() or 1)
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"CTRLMESH_PG_WORKERS must be between 1 and {MAX_WORKERS}, not {count}")
    return count


def worker_pool_size(pool_size: int, workers: int) -> int:
    """Each worker's share of CTRLMESH_PG_POOL_SIZE, so the compute sees at most about that many
    backends per database whatever the number of workers."""
    return max(1, -(-pool_size // workers))


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux only; a no-op elsewhere)."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _Worker:
    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restart_at: float | None = None
        self.delay = RESTART_MIN_SECONDS
        self.quick_crashes = 0


class Supervisor:
    """Runs `count` workers, each `command(slot)`, until SIGTERM/SIGINT; restarts the ones that die."""

    def __init__(
        self,
        count: int,
        command: Callable[[WorkerSlot], Sequence[str]],
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        """`pass_fds`: descriptors every worker inherits (the listening Unix socket, which only
        one process can bind: the workers accept on it together)."""
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.workers = [_Worker(WorkerSlot(i, count, tag)) for i in range(count)]
        self._command = command
        self._cwd = cwd
        self._env = env
        self._pass_fds = pass_fds
        self._stop = 0

    def _start(self, w: _Worker) -> None:
        w.proc = subprocess.Popen(
            list(self._command(w.slot)), cwd=self._cwd, env=self._env, pass_fds=self._pass_fds
        )
        w.started = time.monotonic()
        w.restart_at = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop = signum

    def run(self) -> int:
        """Supervise until told to stop (exit code 0) or a worker keeps crashing (1)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        for w in self.workers:
            self._start(w)
        log.info("PG Gateway supervisor: %d worker(s)", len(self.workers))
        code = 0
        try:
            while not self._stop:
                if not self._check():
                    code = 1
                    break
                time.sleep(_POLL)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _check(self) -> bool:
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None:
                if w.restart_at is not None and now >= w.restart_at:
                    self._start(w)
                continue
            rc = w.proc.poll()
            if rc is None:
                if now - w.started >= RESTART_STABLE_SECONDS:
                    w.delay, w.quick_crashes = RESTART_MIN_SECONDS, 0
                continue
            w.proc = None
            if self._stop:
                continue  # a Ctrl-C reaches the workers too: one that stopped for it stays stopped
            if now - w.started < RESTART_STABLE_SECONDS:
                w.quick_crashes += 1
            else:
                w.delay, w.quick_crashes = RESTART_MIN_SECONDS, 0
            if w.quick_crashes >= MAX_QUICK_CRASHES:
                log.error(
                    "gateway worker %d exited %d times in a row within %.0f s of starting; stopping",
                    w.slot.index,
                    w.quick_crashes,
                    RESTART_STABLE_SECONDS,
                )
                return False
            log.warning(
                "gateway worker %d exited with code %s; restarting it in %.1f s", w.slot.index, rc, w.delay
            )
            w.restart_at = now + w.delay
            w.delay = min(w.delay * 2, RESTART_MAX_SECONDS)
        return True

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.proc.poll() is None]

    def _stop_all(self) -> None:
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("gateway worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.wait()


def module_command(module: str, *extra: str) -> Callable[[WorkerSlot], list[str]]:
    """`python -m module <extra> <slot arguments>`: how a supervisor starts its workers."""

    def command(slot: WorkerSlot) -> list[str]:
        return [sys.executable, "-m", module, *extra, *slot.argv()]

    return command
