"""The compute driver interface: how the databases service turns "a writer must run" into a real
PostgreSQL server. `local` (compute/local.py) runs one server process per database on this
machine; a container or Kubernetes driver implements the same protocol.

Every method is idempotent, because the reconciler calls them again after a restart without
knowing how far the previous attempt got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from services.databases.compute.cgroups import Limits
from services.databases.compute.profiles import Profile


class ComputeError(RuntimeError):
    """A compute could not be prepared, started or stopped (the message is for operators)."""


@dataclass(frozen=True)
class ComputeSpec:
    """What a driver needs to know about a database, whatever runs it."""

    db_id: str
    tenant_id: str
    # The database name inside the compute (the ctrlmesh database name, the DSN's path).
    db_name: str
    # The tenant's PostgreSQL role, owner of that database.
    role: str
    # Writer generation (the database's lease_control_epoch when it booted): names the worker.
    generation: int = 0


@dataclass(frozen=True)
class Endpoint:
    """A running writer: where it listens and which worker it is."""

    host: str
    port: int
    worker_id: str
    # Monotonic seconds the driver spent from spawn to ready (for the cold-start metric).
    boot_seconds: float = 0.0


class ComputeDriver(Protocol):
    name: str
    # Whether computes are this process's children that must not outlive a clean shutdown
    # (local); a container driver leaves them to the orchestrator.
    stop_on_shutdown: bool

    async def prepare(self, spec: ComputeSpec, role_verifier: str) -> None:
        """Create the storage (data directory), the tenant's role with this SCRAM verifier and the
        database it owns. Never on the wake path; repeating it replaces a half-made one."""

    async def start(self, spec: ComputeSpec, profile: Profile) -> Endpoint:
        """Start the writer (or adopt the one already running) and return once it accepts logins.
        The caller then sets the role's verifier (fetched meanwhile, in parallel)."""

    async def stop(self, spec: ComputeSpec) -> None:
        """Stop the writer cleanly (a shutdown checkpoint); nothing when it does not run."""

    async def is_alive(self, spec: ComputeSpec) -> bool:
        """Whether a writer for this database is running."""

    async def set_role_verifier(self, spec: ComputeSpec, role_verifier: str) -> None:
        """Set the role's password (a SCRAM verifier) on the running writer."""

    async def role_verifier_applied(self, spec: ComputeSpec, role_verifier: str) -> bool:
        """Whether this verifier is the one last set on the database's role (then a boot need not
        wait for setting it again)."""

    async def destroy(self, spec: ComputeSpec) -> None:
        """Stop the writer if it runs and delete the storage."""

    async def storage_bytes(self, spec: ComputeSpec) -> int:
        """Bytes the database's storage uses now."""

    async def checkpoint(self, spec: ComputeSpec) -> None:
        """Run a CHECKPOINT on the running writer (before a handoff: a short shutdown)."""

    async def prepare_candidate(self, spec: ComputeSpec, profile: Profile) -> None:
        """Make what a new writer generation with this profile needs before it starts (its
        cgroup); the writer runs on until the handoff stops it."""

    def limits(self) -> Limits:
        """Whether (and how) profiles' CPU and memory limits are enforced."""

    async def cpu_seconds(self, spec: ComputeSpec) -> float | None:
        """CPU time the writer generation used so far; None when unknown (the autoscaler)."""
