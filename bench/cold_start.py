"""Cold start: a `stopped` database → the first query's result, p50/p95/p99 over N runs.

    .venv/bin/python bench/cold_start.py [--runs 30] [--mode auto|gateway|direct]

Starts a private mesh with the real launcher (idle timeout 300 ms, so the database is stopped
again between runs), creates one L1 database, and times each run from the client's first byte:

- `gateway`: asyncpg connects through the PG Gateway (TLS, verify-full against the gateway's CA,
  SCRAM-SHA-256) and runs `select 1`. The gateway acquires the lease, which boots the writer.
- `direct`: what the Gateway does, without it: AcquireLease(wait=true) over gRPC, then asyncpg
  connects straight to the writer (SCRAM, no TLS) and runs `select 1`.

`auto` measures through the Gateway when `pggateway` is installed and answers, else `direct`,
and says which in the output. Results go to bench/results/cold_start.json and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from bench.readme import write_block  # noqa: E402
from tests.fixtures.databases import Leases  # noqa: E402
from tests.fixtures.mesh import Mesh, free_port, start_mesh  # noqa: E402

RESULTS = ROOT / "bench" / "results"
IDLE_TIMEOUT = "300ms"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def wait_stopped(client: httpx.Client, db_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"/v2/dbs/{db_id}").json()["state"] != "stopped":
        if time.monotonic() > deadline:
            raise RuntimeError("the database did not stop between runs")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def start_gateway(mesh: Mesh) -> tuple[subprocess.Popen[bytes] | None, Path | None]:
    """The PG Gateway on the mesh's CTRLMESH_PG_PORT (started here unless the launcher did)."""
    try:
        from pggateway.tls import CA_CERT
    except ImportError:
        return None, None
    port = int(mesh.env["CTRLMESH_PG_PORT"])
    proc = None
    if not port_open(port):
        env = {**mesh.env, "CTRLMESH_PG_METRICS_PORT": str(free_port())}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pggateway.main"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                return None, None
            time.sleep(0.1)
    return proc, mesh.data_dir / "pggateway" / CA_CERT


async def run_gateway(mesh: Mesh, tenant: dict[str, Any], ca: Path) -> float:
    ctx = ssl.create_default_context(cafile=str(ca))
    t0 = time.perf_counter()
    conn = await asyncpg.connect(
        host="localhost",
        port=int(mesh.env["CTRLMESH_PG_PORT"]),
        user=tenant["pg_user"],
        password=tenant["pg_password"],
        database="bench",
        ssl=ctx,
        timeout=30,
    )
    assert await conn.fetchval("select 1") == 1
    elapsed = time.perf_counter() - t0
    await conn.close()
    return elapsed


async def run_direct(leases: Leases, tenant: dict[str, Any]) -> tuple[float, float]:
    t0 = time.perf_counter()
    lease = await leases.acquire(tenant["tenant"]["id"], "bench", "bench-holder", ttl_s=30)
    t_lease = time.perf_counter() - t0
    conn = await asyncpg.connect(
        host=lease.writer_host,
        port=lease.writer_port,
        user=tenant["pg_user"],
        password=tenant["pg_password"],
        database="bench",
        timeout=30,
    )
    assert await conn.fetchval("select 1") == 1
    elapsed = time.perf_counter() - t0
    await conn.close()
    await leases.release(lease)
    return elapsed, t_lease


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--mode", choices=("auto", "gateway", "direct"), default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS / "cold_start.json")
    ap.add_argument("--no-readme", action="store_true", help="do not update README.md's Benchmarks table")
    args = ap.parse_args()

    mesh = start_mesh({"CTRLMESH_IDLE_TIMEOUT": IDLE_TIMEOUT})
    gateway: subprocess.Popen[bytes] | None = None
    try:
        admin = mesh.admin()
        tenant = admin.post("/v2/tenants", json={"name": f"bench_{os.getpid()}"}).json()
        db = admin.post(
            f"/v2/tenants/{tenant['tenant']['name']}/dbs", json={"name": "bench", "size": "L1"}
        ).json()
        mode, note, ca = args.mode, "", None
        if mode in ("auto", "gateway"):
            gateway, ca = start_gateway(mesh)
            if ca is not None:
                try:
                    asyncio.run(run_gateway(mesh, tenant, ca))  # a probe; also makes the first boot
                    mode = "gateway"
                except Exception as err:  # anything: the gateway is someone else's work in progress
                    note = f"PG Gateway did not answer ({type(err).__name__}: {err}); measured direct"
                    mode = "direct"
            else:
                note, mode = "PG Gateway not available; measured direct", "direct"
        samples: list[float] = []
        lease_part: list[float] = []

        async def direct_runs() -> None:
            leases = Leases(mesh)
            try:
                for _ in range(args.runs):
                    await asyncio.to_thread(wait_stopped, admin, db["db_id"])
                    total, lease_s = await run_direct(leases, tenant)
                    samples.append(total * 1000)
                    lease_part.append(lease_s * 1000)
            finally:
                await leases.close()

        async def gateway_runs() -> None:
            assert ca is not None
            for _ in range(args.runs):
                await asyncio.to_thread(wait_stopped, admin, db["db_id"])
                samples.append(await run_gateway(mesh, tenant, ca) * 1000)

        asyncio.run(gateway_runs() if mode == "gateway" else direct_runs())
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        mesh.stop()
        mesh.remove_computes()

    label = (
        "stopped database → first `select 1` result through the PG Gateway (TLS verify-full, SCRAM-SHA-256)"
        if mode == "gateway"
        else "stopped database → AcquireLease(wait) → asyncpg connect to the writer (SCRAM, no TLS) → "
        "first `select 1` result; no PG Gateway in the path"
    )
    result: dict[str, Any] = {
        "benchmark": "cold_start",
        "mode": mode,
        "label": label,
        "note": note,
        "runs": len(samples),
        "size": "L1",
        "idle_timeout": IDLE_TIMEOUT,
        "p50_ms": round(percentile(samples, 50), 1),
        "p95_ms": round(percentile(samples, 95), 1),
        "p99_ms": round(percentile(samples, 99), 1),
        "min_ms": round(min(samples), 1),
        "max_ms": round(max(samples), 1),
        "samples_ms": [round(x, 2) for x in samples],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if lease_part:
        result["acquire_lease_wait_p50_ms"] = round(percentile(lease_part, 50), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "| Cold start, L1 (stopped → first query result) | runs | p50 | p95 | p99 |\n|---|---|---|---|---|\n"
        f"| {label} | {result['runs']} | {result['p50_ms']} ms | {result['p95_ms']} ms | {result['p99_ms']} ms |"
    )
    footer = (
        f"\n{os.cpu_count()} CPUs, {platform.system()} {platform.release()}; `bench/cold_start.py` "
        f"({mode}), {time.strftime('%Y-%m-%d')}." + (f" {note}" if note else "")
    )
    (args.out.with_suffix(".md")).write_text(table + "\n" + footer + "\n")
    if not args.no_readme:
        write_block("cold_start", table + "\n" + footer)
    sys.stdout.write(table + "\n" + footer + f"\nwrote {args.out}\n")


if __name__ == "__main__":
    main()
