"""Live writer handoffs under load, against the classic anchor.

    .venv/bin/python bench/handoff.py [--duration 60] [--clients 16] [--scale 10] [--every 5]
        [--targets ctrlmesh,pgbouncer] [--readme]

Both runs use pgbench's TPC-B (the default script, `-M simple`) over TLS, `--clients` clients,
scale `--scale`, for `--duration` seconds, with a profile change every `--every` seconds
alternating L1/L2, in the same invocation:

- `ctrlmesh`: a private mesh (the real launcher) and one database; pgbench → the PG Gateway
  (transaction pooling) → the writer. Every `--every` s the bench asks RequestHandoff for the
  other profile and waits for it to finish (the mesh runs with autoscale_cooldown 0 and the
  policy off, so only these handoffs happen). Freeze window: the control plane's, from the
  commit of `freeze_new_checkouts` (FREEZING) to the commit of the new writer (SWITCHING), from
  the phases on /v2/events; the gateways' own histogram (first held checkout → release) is
  reported as its mean.
- `pgbouncer`: Debian's PgBouncer in transaction mode (pool 20) in front of one PostgreSQL; every
  `--every` s: `PAUSE` (waits for the in-flight transactions), a restart of PostgreSQL with the
  other profile's settings, `RECONNECT`, `RESUME`. Freeze window: PAUSE sent → RESUME answered.

Reported for each: pgbench's failed transactions plus aborted clients, the freeze windows
(p50/p99/max), the longest transaction latency seen around a handoff, and TPS in 1 s buckets:
the lowest bucket around each handoff against the steady state (the median of the buckets more
than 1 s from any handoff). Writes bench/results/handoff.json and prints a markdown table
(`--readme` also puts it into README.md's Benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import grpc  # noqa: E402
import httpx  # noqa: E402
import psycopg  # noqa: E402
from ctrlmesh.databases.v1 import databases_pb2 as dpb  # noqa: E402
from ctrlmesh.databases.v1 import databases_pb2_grpc as dgrpc  # noqa: E402

from bench.pg_gateway import _free_port, _tool, _wait_port  # noqa: E402
from bench.readme import write_block  # noqa: E402
from libs import principal as principals  # noqa: E402
from libs.embedded_pg import PG_OS_USER, EmbeddedPostgres  # noqa: E402
from services.databases.compute.profiles import PROFILES  # noqa: E402
from tests.fixtures.api import grpc_call  # noqa: E402
from tests.fixtures.databases import tenant_with_db  # noqa: E402
from tests.fixtures.mesh import Mesh, start_mesh  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PASSWORD = "bench-Pw-7d1f0b"
USER = "tnt_bench"
DATABASE = "bench"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def pgbench(
    cmd: list[str], env: dict[str, str], logdir: Path
) -> tuple[subprocess.CompletedProcess[str], list[tuple[float, int]]]:
    """Run pgbench with a per-transaction log; (its result, [(completion time, latency µs)])."""
    logdir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([*cmd, "-l", f"--log-prefix={logdir / 'tx'}"], env=env, capture_output=True, text=True)
    txs = []
    for f in logdir.iterdir():
        for line in f.read_text().splitlines():
            parts = line.split()
            # client_id transaction_no time script_no time_epoch time_us
            txs.append((int(parts[4]) + int(parts[5]) / 1e6, int(parts[2])))
    return r, txs


def failures(r: subprocess.CompletedProcess[str]) -> dict[str, int]:
    failed = 0
    if "number of failed transactions: " in r.stdout:
        failed = int(r.stdout.split("number of failed transactions: ")[1].split()[0])
    aborted = r.stderr.count(" aborted ") + r.stderr.count("aborted in command")
    return {"failed_transactions": failed, "aborted_clients": aborted, "exit_code": r.returncode}


def buckets(txs: list[tuple[float, int]], start: float, end: float, handoffs: list[float]) -> dict[str, Any]:
    """TPS per 1 s bucket; the lowest bucket around each handoff vs the steady median."""
    n = int(end - start)
    counts = [0] * max(n, 1)
    for t, _ in txs:
        i = int(t - start)
        if 0 <= i < n:
            counts[i] += 1
    near = {int(h - start) + d for h in handoffs for d in (-1, 0, 1, 2)}
    steady = [c for i, c in enumerate(counts) if i not in near and 1 <= i < n - 1]
    steady_tps = statistics.median(steady) if steady else None
    dips = []
    for h in handoffs:
        i = int(h - start)
        around = [counts[j] for j in (i, i + 1) if 0 <= j < n]
        if around:
            dips.append(min(around))
    return {
        "tps_per_second": counts,
        "steady_tps": steady_tps,
        "handoff_bucket_tps_min": min(dips) if dips else None,
        "handoff_bucket_tps_median": statistics.median(dips) if dips else None,
        "handoff_bucket_vs_steady": round(statistics.median(dips) / steady_tps, 2)
        if dips and steady_tps
        else None,
    }


def stalls(txs: list[tuple[float, int]], windows: list[tuple[float, float]]) -> list[float]:
    """The longest transaction latency (ms) completing within each handoff window (+1 s)."""
    out = []
    for a, b in windows:
        lat = [us for t, us in txs if a <= t <= b + 1.0]
        out.append(max(lat) / 1000 if lat else 0.0)
    return out


def summary(freeze_ms: list[float], stall_ms: list[float]) -> dict[str, Any]:
    r = lambda v: None if v is None else round(v, 1)  # noqa: E731
    return {
        "handoffs": len(freeze_ms),
        "freeze_ms": [round(x, 1) for x in freeze_ms],
        "freeze_p50_ms": r(pct(freeze_ms, 0.5)),
        "freeze_p99_ms": r(pct(freeze_ms, 0.99)),
        "freeze_max_ms": r(max(freeze_ms) if freeze_ms else None),
        "stall_max_ms": r(max(stall_ms) if stall_ms else None),
        "stall_p50_ms": r(pct(stall_ms, 0.5)),
    }


# -- ctrlmesh ---------------------------------------------------------------------------------------


class EventLog:
    def __init__(self, mesh: Mesh, db_id: str):
        self.seen: list[dict[str, Any]] = []
        self._stop = False
        ready = threading.Event()

        def listen() -> None:
            with httpx.stream(
                "GET",
                f"{mesh.base_url}/v2/events",
                params={"token": mesh.admin_key},
                timeout=httpx.Timeout(None),
            ) as resp:
                ready.set()
                for line in resp.iter_lines():
                    if self._stop:
                        return
                    if line.startswith("data: "):
                        ev = json.loads(line[6:])
                        if ev["type"] == "database.scale_state_changed" and ev["resource_id"] == db_id:
                            self.seen.append(ev["data"])

        threading.Thread(target=listen, daemon=True).start()
        ready.wait(10)

    def stop(self) -> None:
        self._stop = True


def _ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _gateway_histogram(mesh: Mesh) -> dict[str, float]:
    total, count, held = 0.0, 0.0, 0.0
    base = int(mesh.env["CTRLMESH_PG_METRICS_PORT"])
    for i in range(int(mesh.env.get("CTRLMESH_PG_WORKERS", "1"))):
        try:
            text = httpx.get(f"http://127.0.0.1:{base + i}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            if line.startswith("pggateway_freeze_window_seconds_sum"):
                total += float(line.split()[-1])
            elif line.startswith("pggateway_freeze_window_seconds_count"):
                count += float(line.split()[-1])
            elif line.startswith("pggateway_held_checkouts_released_total"):
                held += float(line.split()[-1])
    return {
        "gateway_freezes": count,
        "gateway_freeze_mean_ms": round(1000 * total / count, 1) if count else 0.0,
        "checkouts_held": held,
    }


def run_ctrlmesh(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    mesh = start_mesh(
        {
            "CTRLMESH_AUTOSCALE_ENABLED": "false",
            "CTRLMESH_AUTOSCALE_COOLDOWN": "0s",
            "CTRLMESH_PG_POOL_SIZE": "20",
            "CTRLMESH_START_TIMEOUT": "150s",
        },
        timeout=180,
    )
    try:
        t = tenant_with_db(mesh)
        env = {**os.environ, "PGPASSWORD": t.pg_password, "PGSSLMODE": "require", "PGCONNECT_TIMEOUT": "30"}
        conn = ["-h", "localhost", "-p", mesh.env["CTRLMESH_PG_PORT"], "-U", t.pg_user, "app"]
        print(f"ctrlmesh: pgbench -i -s {args.scale} through the gateway …", flush=True)
        init = subprocess.run(
            [_tool("pgbench"), "-i", "-q", "-s", str(args.scale), *conn],
            env=env,
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            raise SystemExit(init.stderr)
        events = EventLog(mesh, t.db_id)
        done: list[dict[str, Any]] = []
        stop = threading.Event()

        def handoffs() -> None:
            target = "L2"
            while not stop.wait(args.every):
                t0 = time.time()
                try:
                    grpc_call(
                        mesh,
                        "databases",
                        dgrpc.AutoscalerServiceStub,
                        "RequestHandoff",
                        dpb.RequestHandoffRequest(db_id=t.db_id, target_profile=target, reason="bench"),
                        principals.system_principal("bench"),
                    )
                except grpc.RpcError as err:
                    done.append({"at": t0, "target": target, "refused": str(err.details())})
                    continue
                while True:
                    db = mesh.admin().get(f"/v2/dbs/{t.db_id}").json()
                    if db["scale_state"] in ("COOLDOWN", "STEADY", "FAILED"):
                        break
                    time.sleep(0.02)
                done.append(
                    {
                        "at": t0,
                        "end": time.time(),
                        "target": target,
                        "result": db["scale_state"],
                        "reason": db.get("scale_failure_reason"),
                    }
                )
                target = "L1" if target == "L2" else "L2"

        th = threading.Thread(target=handoffs, daemon=True)
        cmd = [_tool("pgbench"), "-n", "-c", str(args.clients), "-j", "4", "-T", str(args.duration), *conn]
        print(
            f"ctrlmesh: pgbench {args.clients} clients, {args.duration} s, a handoff every {args.every} s …",
            flush=True,
        )
        start = time.time()
        th.start()
        r, txs = pgbench(cmd, env, work / "ctrlmesh-log")
        end = time.time()
        stop.set()
        th.join(60)
        time.sleep(0.5)
        events.stop()
        # Freeze windows from the phases: FREEZING's start → SWITCHING's start, per handoff.
        freeze: list[float] = []
        frozen_at: float | None = None
        for e in events.seen:
            if e["scale_state"] == "FREEZING":
                frozen_at = _ts(e["scale_phase_started_at"])
            elif e["scale_state"] in ("SWITCHING", "FAILED") and frozen_at is not None:
                freeze.append(1000 * (_ts(e["scale_phase_started_at"]) - frozen_at))
                frozen_at = None
        windows = [(d["at"], d["end"]) for d in done if "end" in d]
        phases: dict[str, list[float]] = {}
        for a, b in zip(events.seen, events.seen[1:], strict=False):
            if a["scale_state"] not in ("COOLDOWN", "STEADY", "FAILED"):
                ms = 1000 * (_ts(b["scale_phase_started_at"]) - _ts(a["scale_phase_started_at"]))
                phases.setdefault(a["scale_state"], []).append(ms)
        out = {
            "target": "ctrlmesh",
            "phase_p50_ms": {k: round(statistics.median(v), 1) for k, v in phases.items()},
            **failures(r),
            "transactions": len(txs),
            "tps": round(len(txs) / (end - start), 1),
            "handoff_results": [d.get("result") or "refused" for d in done],
            **summary(freeze, stalls(txs, windows)),
            **_gateway_histogram(mesh),
            **buckets(txs, start, end, [d["at"] for d in done]),
        }
        if r.returncode != 0:
            out["pgbench_stderr_tail"] = r.stderr[-2000:]
        return out
    finally:
        mesh.stop()
        mesh.cleanup()


# -- PgBouncer ---------------------------------------------------------------------------------------


def run_pgbouncer(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    subprocess.run(["bash", str(ROOT / "scripts" / "install-system-deps.sh"), "pgbouncer"], check=True)
    binary = _tool("pgbouncer")
    pw = pwd.getpwnam(PG_OS_USER) if os.geteuid() == 0 else None
    distro = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    bindir = distro[-1].parent if distro else None

    def settings(profile: str) -> dict[str, str]:
        s = PROFILES[profile].settings()
        s.pop("unix_socket_directories", None)
        return {**s, "listen_addresses": "127.0.0.1"}

    pg = EmbeddedPostgres(work / "compute", port=_free_port(), settings=settings("L1"), bindir=bindir)
    pg.start()
    from pggateway.scram import Verifier
    from pggateway.tls import ensure_material

    tls = ensure_material(work / "tls", "localhost")
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{Verifier.from_password(PASSWORD).text()}'")
        c.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")
    port = _free_port()
    bdir = work / "pgbouncer"
    bdir.mkdir()
    shutil.copy(tls.cert_path, bdir / "tls.crt")
    shutil.copy(tls.key_path, bdir / "tls.key")
    (bdir / "userlist.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
    (bdir / "pgbouncer.ini").write_text(
        f"""[databases]
{DATABASE} = host=127.0.0.1 port={pg.port} dbname={DATABASE}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {bdir / "userlist.txt"}
admin_users = {USER}
pool_mode = transaction
default_pool_size = 20
max_client_conn = 500
client_tls_sslmode = require
client_tls_cert_file = {bdir / "tls.crt"}
client_tls_key_file = {bdir / "tls.key"}
server_tls_sslmode = disable
server_check_delay = 0
ignore_startup_parameters = extra_float_digits
logfile = {bdir / "pgbouncer.log"}
pidfile = {bdir / "pgbouncer.pid"}
"""
    )
    kw: dict[str, Any] = {}
    if pw is not None:  # PgBouncer refuses to run as root
        for p in [bdir, *bdir.iterdir()]:
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(work, 0o755)
        kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    bouncer = subprocess.Popen([binary, "-q", str(bdir / "pgbouncer.ini")], **kw)
    try:
        _wait_port(port, bouncer)
        env = {**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "require", "PGCONNECT_TIMEOUT": "30"}
        conn = ["-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE]
        print(f"pgbouncer: pgbench -i -s {args.scale} …", flush=True)
        init = subprocess.run(
            [_tool("pgbench"), "-i", "-q", "-s", str(args.scale), *conn],
            env=env,
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            raise SystemExit(init.stderr)
        admin = psycopg.connect(
            host="127.0.0.1",
            port=port,
            user=USER,
            password=PASSWORD,
            dbname="pgbouncer",
            sslmode="require",
            autocommit=True,
        )
        done: list[dict[str, Any]] = []
        stop = threading.Event()

        def console(sql: str) -> None:
            res = admin.pgconn.exec_(sql.encode())
            if res.error_message:
                raise RuntimeError(res.error_message.decode())

        def restarts() -> None:
            target = "L2"
            while not stop.wait(args.every):
                t0 = time.time()
                console(f"PAUSE {DATABASE}")
                pg.stop("fast")
                pg.settings = settings(target)
                pg.start()
                console(f"RECONNECT {DATABASE}")
                console(f"RESUME {DATABASE}")
                done.append({"at": t0, "end": time.time(), "target": target})
                target = "L1" if target == "L2" else "L2"

        th = threading.Thread(target=restarts, daemon=True)
        cmd = [_tool("pgbench"), "-n", "-c", str(args.clients), "-j", "4", "-T", str(args.duration), *conn]
        print(
            f"pgbouncer: pgbench {args.clients} clients, {args.duration} s, PAUSE/restart/RESUME every {args.every} s …",
            flush=True,
        )
        start = time.time()
        th.start()
        r, txs = pgbench(cmd, env, work / "pgbouncer-log")
        end = time.time()
        stop.set()
        th.join(60)
        admin.close()
        windows = [(d["at"], d["end"]) for d in done]
        out = {
            "target": "pgbouncer",
            **failures(r),
            "transactions": len(txs),
            "tps": round(len(txs) / (end - start), 1),
            **summary([1000 * (b - a) for a, b in windows], stalls(txs, windows)),
            **buckets(txs, start, end, [d["at"] for d in done]),
        }
        if r.returncode != 0:
            out["pgbench_stderr_tail"] = r.stderr[-2000:]
        return out
    finally:
        bouncer.terminate()
        bouncer.wait(10)
        pg.stop("immediate")


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Handoff under load (`bench/handoff.py`): pgbench TPC-B, {meta['clients']} clients, scale {meta['scale']}, "
        f"{meta['duration']} s, a profile change every {meta['every']} s alternating L1/L2; {meta['machine']}.",
        "",
        "| | handoffs | failed tx (pgbench + aborted clients) | freeze p50 / p99 / max | longest tx around a handoff "
        "| TPS steady | TPS in the handoff's 1 s buckets (median, min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = (
            "ctrlmesh (PG Gateway handoff)"
            if r["target"] == "ctrlmesh"
            else "PgBouncer PAUSE → restart → RESUME"
        )
        lines.append(
            f"| {name} | {r['handoffs']} | {r['failed_transactions']} + {r['aborted_clients']} "
            f"| {r['freeze_p50_ms']} / {r['freeze_p99_ms']} / {r['freeze_max_ms']} ms | {r['stall_max_ms']} ms "
            f"| {r['steady_tps']} | {r['handoff_bucket_tps_median']}, {r['handoff_bucket_tps_min']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=60)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--every", type=float, default=5.0)
    p.add_argument("--targets", default="ctrlmesh,pgbouncer")
    p.add_argument("--readme", action="store_true", help="also write the table into README.md")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctrlmesh-bench-handoff-"))
    rows = []
    try:
        for target in args.targets.split(","):
            rows.append(run_ctrlmesh(args, work) if target == "ctrlmesh" else run_pgbouncer(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "clients": args.clients,
        "scale": args.scale,
        "duration": args.duration,
        "every": args.every,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "handoff.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    text = table(rows, meta)
    print(text)
    if args.readme:
        write_block("handoff", text)


if __name__ == "__main__":
    main()
