"""PG Gateway throughput and latency: pgbench through the gateway, direct, and through PgBouncer.

    .venv/bin/python bench/pg_gateway.py [--duration 10] [--clients 1,10,50] [--scale 10]
        [--modes simple,prepared] [--pgbouncer /path/to/pgbouncer]

One compute (a real PostgreSQL from libs.embedded_pg, fsync and synchronous_commit on, TLS on)
with the tenant role and a pgbench database, and three ways to reach it, measured side by side
(interleaved per workload and client count) with pgbench over TLS (sslmode=require) each time:

- `direct`: pgbench → the compute;
- `gateway`: pgbench → the PG Gateway (`pggateway.standalone`: its supervisor and `--workers`
  worker processes sharing a pool size of 20, SCRAM, transaction pooling) → the compute. The gateway's
  control plane here is a static one (one tenant, one always-ready database), so the figures are
  the relay's, not the control plane's;
- `pgbouncer`: pgbench → Debian's PgBouncer in transaction mode (default_pool_size 20, TLS to
  clients) → the compute. `scripts/install-system-deps.sh pgbouncer` installs it when missing.

Workloads: select-only (`-S`) and TPC-B (pgbench's default script), at each client count, in
pgbench's `-M simple` (one Query a statement) and `-M prepared` (named statements: Parse once per
connection, then Bind/Execute) modes. `-M prepared` through a transaction pooler needs the pooler
to keep the statements (the gateway's CTRLMESH_PG_MAX_PREPARED_STATEMENTS, PgBouncer's
max_prepared_statements, 1.21 and later); a PgBouncer without it is left out of those rows.
Reported: TPS, latency median (from pgbench's per-transaction log), the gateway/direct and
gateway/pgbouncer ratios, the latency the gateway adds at one client, and CPU seconds per
transaction of the gateway (all its processes) and of PgBouncer, from /proc/<pid>/stat. Writes
bench/results/pg_gateway.json, prints a markdown table and puts it in README.md's Benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import psycopg  # noqa: E402

from bench.readme import write_block  # noqa: E402
from libs.embedded_pg import PG_OS_USER, EmbeddedPostgres  # noqa: E402
from pggateway.scram import Verifier  # noqa: E402
from pggateway.standalone import PASSWORD_ENV  # noqa: E402

RESULTS = ROOT / "bench" / "results"
USER = "tnt_bench"
PASSWORD = "bench-Pw-3c9e1a"
DATABASE = "bench"
TENANT_ID = "ten_bench"
TARGETS = ("direct", "gateway", "pgbouncer")
WORKLOADS = {"select-only": ["-S"], "tpc-b": []}
MODES = ("simple", "prepared")
MAX_PREPARED = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    for cand in (Path("/usr/lib/postgresql/15/bin") / name, shutil.which(name), Path("/usr/sbin") / name):
        if cand and os.access(cand, os.X_OK):
            return str(cand)
    raise SystemExit(f"{name} not found")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _with_children(pid: int) -> list[int]:
    """A process and its children (the gateway's supervisor and its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def _pgbouncer_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    words = out.split()
    text = words[1] if len(words) > 1 else "0"
    return tuple(int(p) for p in text.split(".") if p.isdigit())


# -- set-up -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="ctrlmesh-bench-pggw-"))
        self.compute: EmbeddedPostgres | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.pgbouncer: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def setup(self) -> None:
        pw = pwd.getpwnam(PG_OS_USER) if os.geteuid() == 0 else None
        # The compute: durable settings, as the databases service runs a writer, plus room for
        # 50 direct clients next to both pools.
        settings = {"max_connections": "200", "shared_buffers": "256MB"}
        # Debian's server build: the one bundled with pgserver has no TLS, and `direct` is over TLS.
        distro = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        bindir = distro[-1].parent if distro else None
        self.compute = EmbeddedPostgres(
            self.work / "compute", port=_free_port(), settings=settings, bindir=bindir
        )
        self.compute.start()
        from pggateway.tls import ensure_material

        tls = ensure_material(self.work / "gw", "localhost")
        cluster = self.compute.cluster_dir
        for src, name in ((tls.cert_path, "bench.crt"), (tls.key_path, "bench.key")):
            shutil.copy(src, cluster / name)
            os.chmod(cluster / name, 0o600)
            if pw is not None:
                os.chown(cluster / name, pw.pw_uid, pw.pw_gid)
        verifier = Verifier.from_password(PASSWORD).text()
        with psycopg.connect(self.compute.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{verifier}'")
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")
            conn.execute("ALTER SYSTEM SET ssl_cert_file = 'bench.crt'")
            conn.execute("ALTER SYSTEM SET ssl_key_file = 'bench.key'")
            conn.execute("ALTER SYSTEM SET ssl = on")
            conn.execute("SELECT pg_reload_conf()")
        self.ports["direct"] = self.compute.port
        print(f"pgbench -i -s {self.args.scale} …", flush=True)
        init = subprocess.run(
            [_tool("pgbench"), "-i", "-q", "-s", str(self.args.scale), *self._conn("direct")],
            env=self._env(),
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            raise SystemExit(init.stderr)

        self.ports["gateway"] = _free_port()
        self.gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pggateway.standalone",
                f"--port={self.ports['gateway']}",
                f"--compute-port={self.compute.port}",
                f"--database={DATABASE}",
                f"--user={USER}",
                f"--tenant-id={TENANT_ID}",
                f"--data-dir={self.work / 'gw'}",
                f"--pool-size={self.args.pool_size}",
                f"--max-prepared={self.args.max_prepared}",
                f"--workers={self.args.workers}",
            ],
            cwd=ROOT,
            env={**os.environ, PASSWORD_ENV: PASSWORD, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"},
        )
        _wait_port(self.ports["gateway"], self.gateway)

        self.pgbouncer_version: tuple[int, ...] = ()
        if "pgbouncer" in self.args.targets:
            if self.args.pgbouncer is None:
                subprocess.run(
                    ["bash", str(ROOT / "scripts" / "install-system-deps.sh"), "pgbouncer"], check=True
                )
            binary = self.args.pgbouncer or _tool("pgbouncer")
            self.pgbouncer_version = _pgbouncer_version(binary)
            # max_prepared_statements came with 1.21; older ones refuse the setting.
            prepared = (
                f"max_prepared_statements = {self.args.max_prepared}"
                if self.pgbouncer_version >= (1, 21)
                else ""
            )
            self.ports["pgbouncer"] = _free_port()
            bdir = self.work / "pgbouncer"
            bdir.mkdir()
            shutil.copy(tls.cert_path, bdir / "tls.crt")
            shutil.copy(tls.key_path, bdir / "tls.key")
            (bdir / "userlist.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
            (bdir / "pgbouncer.ini").write_text(
                f"""[databases]
{DATABASE} = host=127.0.0.1 port={self.compute.port} dbname={DATABASE}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.ports["pgbouncer"]}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {bdir / "userlist.txt"}
pool_mode = transaction
default_pool_size = {self.args.pool_size}
max_client_conn = 500
client_tls_sslmode = require
client_tls_cert_file = {bdir / "tls.crt"}
client_tls_key_file = {bdir / "tls.key"}
server_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
logfile = {bdir / "pgbouncer.log"}
pidfile = {bdir / "pgbouncer.pid"}
{prepared}
"""
            )
            kw: dict[str, Any] = {}
            if pw is not None:  # PgBouncer refuses to run as root
                for p in [bdir, *bdir.iterdir()]:
                    os.chown(p, pw.pw_uid, pw.pw_gid)
                os.chmod(self.work, 0o755)
                kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self.pgbouncer = subprocess.Popen([binary, "-q", str(bdir / "pgbouncer.ini")], **kw)
            _wait_port(self.ports["pgbouncer"], self.pgbouncer)

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "require", "PGCONNECT_TIMEOUT": "30"}

    def _conn(self, target: str) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.ports[target]), "-U", USER, DATABASE]

    def _pid(self, target: str) -> int | None:
        proc = {"gateway": self.gateway, "pgbouncer": self.pgbouncer}.get(target)
        return proc.pid if proc is not None else None

    def _profile(self, workload: str, clients: int, workers: list[int]) -> list[subprocess.Popen[bytes]]:
        """py-spy (a sampling profiler) on each gateway worker for the run, with --profile."""
        out: Path | None = self.args.profile
        if out is None:
            return []
        out.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        return [
            subprocess.Popen(
                [
                    *(spy, "record", "--nonblocking", "-r", "250", "-d", str(self.args.duration)),
                    *("-p", str(pid), "-o", str(out / f"{workload}-c{clients}-w{i}.svg")),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i, pid in enumerate(workers)
        ]

    # -- one pgbench run ----------------------------------------------------------------------
    def supports(self, mode: str, target: str) -> bool:
        if mode == "prepared" and target == "pgbouncer":
            return self.pgbouncer_version >= (1, 21)
        return True

    def run(self, workload: str, clients: int, target: str, mode: str = "simple") -> dict[str, Any]:
        logdir = self.work / "logs" / f"{workload}-{mode}-{clients}-{target}"
        logdir.mkdir(parents=True)
        cmd = [
            _tool("pgbench"),
            "-n",
            *WORKLOADS[workload],
            "-M",
            mode,
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(self.args.duration),
            "-l",
            f"--log-prefix={logdir / 'tx'}",
            *self._conn(target),
        ]
        pid = self._pid(target)
        pids = _with_children(pid) if pid else []
        spies = self._profile(workload, clients, pids[1:]) if target == "gateway" else []
        cpu0 = sum(map(_cpu_seconds, pids))
        r = subprocess.run(cmd, env=self._env(), capture_output=True, text=True)
        cpu = (sum(map(_cpu_seconds, pids)) - cpu0) if pids else None
        for spy in spies:
            spy.wait(30)
        if r.returncode != 0 or "tps = " not in r.stdout:
            raise SystemExit(
                f"pgbench failed ({target}, {workload} {mode}, {clients}):\n{r.stdout}\n{r.stderr}"
            )
        tps = float(r.stdout.split("tps = ")[1].split()[0])
        processed = int(
            r.stdout.split("number of transactions actually processed: ")[1].split("\n")[0].split()[0]
        )
        latencies = []
        for f in logdir.iterdir():
            with f.open() as fh:
                latencies += [int(line.split()[2]) for line in fh]
        shutil.rmtree(logdir)
        out: dict[str, Any] = {
            "workload": workload,
            "mode": mode,
            "clients": clients,
            "target": target,
            "tps": round(tps, 1),
            "transactions": processed,
            "latency_p50_ms": round(statistics.median(latencies) / 1000, 3) if latencies else None,
            "latency_p99_ms": round(statistics.quantiles(latencies, n=100)[98] / 1000, 3)
            if len(latencies) > 100
            else None,
        }
        if cpu is not None and processed:
            out["cpu_seconds"] = round(cpu, 2)
            out["cpu_us_per_tx"] = round(cpu / processed * 1e6, 1)
        print(
            f"  {workload:12} {mode:8} c={clients:<3} {target:10} {tps:10.0f} tps  p50 {out['latency_p50_ms']} ms"
            + (f"  cpu {out['cpu_us_per_tx']} µs/tx" if "cpu_us_per_tx" in out else ""),
            flush=True,
        )
        return out

    def teardown(self) -> None:
        for proc in (self.gateway, self.pgbouncer):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.compute is not None:
            self.compute.destroy()
        shutil.rmtree(self.work, ignore_errors=True)


# -- report -----------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    by = {(r["workload"], r.get("mode", "simple"), r["clients"], r["target"]): r for r in runs}
    for mode, workload in ((m, w) for m in MODES for w in WORKLOADS):
        for clients in sorted({r["clients"] for r in runs}):
            direct, gw, pgb = (by.get((workload, mode, clients, t)) for t in TARGETS)
            if gw is None:
                continue
            row: dict[str, Any] = {
                "workload": workload,
                "mode": mode,
                "clients": clients,
                "gateway_tps": gw["tps"],
            }
            row["gateway_p50_ms"] = gw["latency_p50_ms"]
            row["gateway_cpu_us_per_tx"] = gw.get("cpu_us_per_tx")
            if direct is not None:
                row["direct_tps"] = direct["tps"]
                row["direct_p50_ms"] = direct["latency_p50_ms"]
                row["gateway_vs_direct"] = round(gw["tps"] / direct["tps"], 2)
                row["added_latency_p50_us"] = round((gw["latency_p50_ms"] - direct["latency_p50_ms"]) * 1000)
            if pgb is not None:
                row["pgbouncer_tps"] = pgb["tps"]
                row["pgbouncer_p50_ms"] = pgb["latency_p50_ms"]
                row["gateway_vs_pgbouncer"] = round(gw["tps"] / pgb["tps"], 2)
                row["pgbouncer_cpu_us_per_tx"] = pgb.get("cpu_us_per_tx")
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def f(v: Any, unit: str = "") -> str:
        return "-" if v is None else f"{v:,.0f}{unit}" if isinstance(v, float) and v >= 100 else f"{v}{unit}"

    lines = [
        "| pgbench (TLS everywhere) | -M | clients | direct TPS | gateway TPS | PgBouncer TPS | gw/direct | gw/PgBouncer "
        "| p50 direct / gw / PgBouncer (ms) | CPU per tx gw / PgBouncer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r.get('mode', 'simple')} | {r['clients']} | {f(r.get('direct_tps'))} | {f(r['gateway_tps'])} "
            f"| {f(r.get('pgbouncer_tps'))} | {f(r.get('gateway_vs_direct'), 'x')} | {f(r.get('gateway_vs_pgbouncer'), 'x')} "
            f"| {r.get('direct_p50_ms', '-')} / {r['gateway_p50_ms']} / {r.get('pgbouncer_p50_ms', '-')} "
            f"| {f(r.get('gateway_cpu_us_per_tx'), ' µs')} / {f(r.get('pgbouncer_cpu_us_per_tx'), ' µs')} |"
        )
    one = [
        r
        for r in rows
        if r["clients"] == 1 and "added_latency_p50_us" in r and r.get("mode", "simple") == "simple"
    ]
    added = ", ".join(
        f"{r['workload']} {r['added_latency_p50_us']} µs"
        + (" (7 statements)" if r["workload"] == "tpc-b" else "")
        for r in one
    )
    lines += [
        "",
        f"Latency the gateway adds per transaction at 1 client (p50, vs direct): {added or '-'}. "
        f"{meta['cpus']} CPUs shared by pgbench, PostgreSQL and the pooler; {meta['duration_s']} s per run, "
        f"scale {meta['scale']}, pool size {meta['pool_size']}, gateway workers {meta.get('gateway_workers', 1)}, fsync on; the three targets run back to back "
        "per row, and figures move by tens of percent between runs on this shared machine; "
        f"`bench/pg_gateway.py`, {meta['date']}.",
    ]
    if any(r.get("mode") == "prepared" for r in rows):
        version = meta.get("pgbouncer_version") or "-"
        lines.append(
            f"`-M prepared`: the gateway keeps at most {meta.get('max_prepared', MAX_PREPARED)} statements per "
            f"backend; PgBouncer {version}"
            + (
                f" with max_prepared_statements = {meta.get('max_prepared', MAX_PREPARED)}."
                if meta.get("pgbouncer_prepared")
                else " has no max_prepared_statements (1.21+), so it has no `-M prepared` figures."
            )
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    ap.add_argument("--clients", default="1,10,50")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--modes", default=",".join(MODES), help="pgbench -M modes: simple,prepared")
    ap.add_argument("--max-prepared", type=int, default=MAX_PREPARED, help="statements kept per backend")
    ap.add_argument(
        "--pgbouncer", help="a PgBouncer binary to use instead of Debian's (which is 1.18 on bookworm)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "pg_gateway.json")
    ap.add_argument("--no-readme", action="store_true", help="do not update README.md's Benchmarks table")
    ap.add_argument(
        "--report-only", action="store_true", help="re-render the table from --out, measure nothing"
    )
    ap.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write a py-spy flame graph per gateway worker and run here",
    )
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads(args.out.read_text())
        text = table(saved["summary"], saved["meta"])
        print(text)
        if not args.no_readme:
            write_block("pg_gateway", text)
        return
    args.targets = [t for t in args.targets.split(",") if t]
    clients = [int(c) for c in args.clients.split(",")]
    workloads = [w for w in args.workloads.split(",") if w]
    modes = [m for m in args.modes.split(",") if m]

    bench = Bench(args)
    runs: list[dict[str, Any]] = []
    try:
        bench.setup()
        for mode in modes:
            for workload in workloads:
                for c in clients:
                    for target in args.targets:
                        if bench.supports(mode, target):
                            runs.append(bench.run(workload, c, target, mode))
    finally:
        bench.teardown()

    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "duration_s": args.duration,
        "scale": args.scale,
        "pool_size": args.pool_size,
        "max_prepared": args.max_prepared,
        "pgbouncer_version": ".".join(map(str, bench.pgbouncer_version)) or None,
        "pgbouncer_prepared": bench.pgbouncer_version >= (1, 21),
        "gateway_workers": args.workers,
        "tls": "sslmode=require for every target; the pools reach the compute in plain TCP",
        "openssl": ssl.OPENSSL_VERSION,
    }
    rows = summarize(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2) + "\n")
    text = table(rows, meta)
    print()
    print(text)
    if not args.no_readme:
        write_block("pg_gateway", text)


if __name__ == "__main__":
    main()
