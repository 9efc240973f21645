"""Resource limits for the `local` driver's writers: one cgroup per writer generation with the
profile's CPU quota and memory limit.

cgroup v2 is used where its hierarchy is writable (cpu.max, memory.max, cpu.stat usage_usec);
else the v1 `cpu`, `cpuacct` and `memory` controllers (cpu.cfs_quota_us, memory.limit_in_bytes,
cpuacct.usage). Where neither can be written (no root, a read-only /sys/fs/cgroup) the driver
says so once and runs writers without limits; `status()` tells the API which case holds.

A writer is placed in its cgroup before PostgreSQL starts: the spawn command is a shell that
writes its own pid into the cgroup and then execs the server, so every backend the postmaster
forks is in it from the first instant.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from services.databases.compute.profiles import Profile

log = logging.getLogger("ctrlmesh.databases.cgroups")

ROOT = Path("/sys/fs/cgroup")
PARENT = "ctrlmesh"
PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    mode: str  # "cgroup-v2", "cgroup-v1" or "none"
    detail: str = ""

    @property
    def enforced(self) -> bool:
        return self.mode != "none"


def _writable_dir(path: Path) -> bool:
    try:
        probe = path / f"{PARENT}-probe-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        return True
    except OSError:
        return False


class Cgroups:
    """The cgroups of one driver's writers, named `ctrlmesh/<group>`."""

    def __init__(self, root: Path = ROOT, disabled: bool = False):
        self.root = root
        self.mode = "none"
        self.reason = ""
        if disabled:
            self.reason = "disabled"
        elif (root / "cgroup.controllers").exists() and _writable_dir(root):
            self.mode = "cgroup-v2"
            self._enable_v2()
        elif all(_writable_dir(root / c) for c in ("cpu", "memory")) and (root / "cpu").is_dir():
            self.mode = "cgroup-v1"
        else:
            self.reason = f"no writable cgroup v2 or v1 cpu/memory hierarchy under {root}"
        if self.mode == "none":
            log.warning("writer profiles' CPU and memory limits are NOT enforced: %s", self.reason)
        else:
            log.info("writer profiles' CPU and memory limits enforced with %s", self.mode)

    def status(self) -> Limits:
        return Limits(self.mode, self.reason if self.mode == "none" else "")

    def _enable_v2(self) -> None:
        parent = self.root / PARENT
        try:
            (self.root / "cgroup.subtree_control").write_text("+cpu +memory")
        except OSError:
            pass  # already enabled, or delegated by the manager
        parent.mkdir(exist_ok=True)
        try:
            (parent / "cgroup.subtree_control").write_text("+cpu +memory")
        except OSError as err:
            log.warning("could not enable cpu/memory in %s: %s", parent, err)

    def _dirs(self, group: str) -> list[Path]:
        if self.mode == "cgroup-v2":
            return [self.root / PARENT / group]
        if self.mode == "cgroup-v1":
            dirs = [self.root / c / PARENT / group for c in ("cpu", "memory")]
            if (self.root / "cpuacct").is_dir() and not (self.root / "cpuacct").samefile(self.root / "cpu"):
                dirs.append(self.root / "cpuacct" / PARENT / group)
            return dirs
        return []

    def make(self, group: str, profile: Profile) -> None:
        """Create (or update) the group with the profile's limits; idempotent."""
        if self.mode == "none":
            return
        quota = profile.vcpu * PERIOD_US
        memory = profile.memory_mb * 1024 * 1024
        for d in self._dirs(group):
            d.mkdir(parents=True, exist_ok=True)
        if self.mode == "cgroup-v2":
            d = self._dirs(group)[0]
            (d / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            (d / "memory.max").write_text(str(memory))
        else:
            cpu = self.root / "cpu" / PARENT / group
            (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(quota))
            (self.root / "memory" / PARENT / group / "memory.limit_in_bytes").write_text(str(memory))

    def wrap(self, group: str, cmd: list[str]) -> list[str]:
        """`cmd`, run from inside the group (see the module docstring)."""
        dirs = self._dirs(group)
        if not dirs:
            return cmd
        joins = "; ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in dirs)
        return ["/bin/sh", "-c", f'{joins}; exec "$@"', "ctrlmesh-cgexec", *cmd]

    def limits_of(self, group: str) -> dict[str, int]:
        """The limits as the kernel holds them: cpu quota and period (µs), memory bytes."""
        if self.mode == "cgroup-v2":
            d = self._dirs(group)[0]
            quota, period = (d / "cpu.max").read_text().split()
            return {
                "cpu_quota_us": -1 if quota == "max" else int(quota),
                "cpu_period_us": int(period),
                "memory_bytes": int((d / "memory.max").read_text().strip()),
            }
        if self.mode == "cgroup-v1":
            cpu = self.root / "cpu" / PARENT / group
            return {
                "cpu_quota_us": int((cpu / "cpu.cfs_quota_us").read_text()),
                "cpu_period_us": int((cpu / "cpu.cfs_period_us").read_text()),
                "memory_bytes": int(
                    (self.root / "memory" / PARENT / group / "memory.limit_in_bytes").read_text()
                ),
            }
        return {}

    def pids(self, group: str) -> list[int]:
        dirs = self._dirs(group)
        if not dirs:
            return []
        try:
            return [int(x) for x in (dirs[0] / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def cpu_seconds(self, group: str) -> float | None:
        """CPU time the group's processes used so far (None when unknown)."""
        try:
            if self.mode == "cgroup-v2":
                for line in (self._dirs(group)[0] / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) / 1e6
            elif self.mode == "cgroup-v1":
                acct = self.root / "cpuacct" / PARENT / group / "cpuacct.usage"
                if not acct.exists():
                    acct = self.root / "cpu" / PARENT / group / "cpuacct.usage"
                return int(acct.read_text()) / 1e9
        except (OSError, ValueError):
            return None
        return None

    def groups(self, prefix: str) -> list[str]:
        """The groups whose names start with `prefix` (a database's generations)."""
        dirs = self._dirs("")
        if not dirs:
            return []
        try:
            return [p.name for p in dirs[0].iterdir() if p.is_dir() and p.name.startswith(prefix)]
        except OSError:
            return []

    def remove(self, group: str) -> None:
        """Remove the group once its processes are gone (a busy one is left for the next try)."""
        for d in self._dirs(group):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as err:
                log.debug("cgroup %s not removed yet: %s", d, err)
