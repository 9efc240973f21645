"""The writer profiles L1…L5: the one table that maps a size to PostgreSQL settings, its CPU and
memory class, and its compute units (CU) for billing. The README's profile table mirrors it.

1 CU = 1 vCPU with a 1 GiB memory class; a profile's CU is its billing weight per hour.
shared_buffers is a quarter of the memory class and effective_cache_size three quarters (the
usual PostgreSQL sizing). shared_buffers is also what a cold start pays for: the postmaster
sets its shared memory up before it accepts a connection (~13 ms at 128MB, ~25 ms at 512MB,
~45 ms at 2GB on our test machine), which is one more reason to keep 1 CU small. The `local`
driver applies the PostgreSQL settings and enforces the CPU and memory class with a cgroup per
writer (compute/cgroups.py): a CPU quota of `vcpu` cores and a memory limit of `memory_mb`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Every writer runs with these, whatever its profile: durability is never traded for speed.
COMMON_SETTINGS: dict[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_level": "replica",
    "password_encryption": "scram-sha-256",
    # TCP on 127.0.0.1 only; no Unix socket, so pg_hba's single host line is the only way in.
    "unix_socket_directories": "",
    # A cold start should not pay for JIT setup or a failed huge-page mmap attempt.
    "jit": "off",
    "huge_pages": "off",
    "max_wal_size": "256MB",
    "min_wal_size": "32MB",
}


@dataclass(frozen=True)
class Profile:
    name: str
    cu: int
    vcpu: int
    memory_mb: int
    shared_buffers: str
    effective_cache_size: str
    max_connections: int
    work_mem: str
    maintenance_work_mem: str

    def settings(self) -> dict[str, str]:
        """The PostgreSQL settings of a writer with this profile (COMMON_SETTINGS included)."""
        return {
            **COMMON_SETTINGS,
            "shared_buffers": self.shared_buffers,
            "effective_cache_size": self.effective_cache_size,
            "max_connections": str(self.max_connections),
            "work_mem": self.work_mem,
            "maintenance_work_mem": self.maintenance_work_mem,
            "max_worker_processes": str(max(8, self.vcpu * 2)),
            "max_parallel_workers": str(self.vcpu),
            "max_parallel_workers_per_gather": str(self.vcpu // 2),
        }


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("L1", 1, 1, 1024, "256MB", "768MB", 100, "4MB", "64MB"),
        Profile("L2", 2, 2, 2048, "512MB", "1536MB", 200, "4MB", "128MB"),
        Profile("L3", 3, 3, 3072, "768MB", "2304MB", 300, "8MB", "192MB"),
        Profile("L4", 4, 4, 4096, "1GB", "3GB", 400, "8MB", "256MB"),
        Profile("L5", 5, 5, 5120, "1280MB", "3840MB", 500, "16MB", "320MB"),
    )
}

SIZES = tuple(PROFILES)


def profile(name: str) -> Profile:
    """The profile for a size label; KeyError for anything but L1…L5."""
    return PROFILES[name]
