"""OTLP benchmark: spans per second the instances' receiver ingests (the OpenTelemetry SDK's own
exporters, OTLP/HTTP and OTLP/gRPC, batches of 512 as its BatchSpanProcessor sends them), and
the `/traces` query's latency with 1 M spans stored for one instance.

    .venv/bin/python bench/otlp.py [--exporters 4] [--batches 30] [--seed 1000000] [--no-readme]

An embedded PostgreSQL (the bundled binaries, default settings) holds the instances schema; the
receiver runs in a process of its own (as in the instances service), the exporters as threads
of this one. The 1 M spans (100 k traces of 10 spans over the last 23 hours) are seeded with
COPY through the store; the query is the one behind `GET /v1/instances/{id}/traces` (the
newest 20 traces of the last hour, with all their spans), timed without the edge. Writes
bench/results/otlp.json and the table under "Benchmarks" in README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: E402
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.readme import write_block  # noqa: E402
from libs.db import Database, make_engine, migrate  # noqa: E402
from libs.embedded_pg import EmbeddedPostgres  # noqa: E402
from libs.settings import Settings  # noqa: E402
from services.instances.otlp import Telemetry  # noqa: E402
from tests.fixtures.mesh import free_block  # noqa: E402

MIGRATIONS = ROOT / "services" / "instances" / "migrations"
BATCH = 512


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def settings(grpc_port: int, http_port: int) -> Settings:
    return Settings(otlp_grpc_port=grpc_port, otlp_http_port=http_port, otlp_rate_limit=0)


def serve(url: str, grpc_port: int, http_port: int) -> None:
    """The receiver alone, in this process (the child the benchmark starts)."""

    async def run() -> None:
        db = Database(make_engine(url))
        await Telemetry(db, settings(grpc_port, http_port)).receiver.run()

    asyncio.run(run())


def start_receiver(url: str, port: int) -> subprocess.Popen[bytes]:
    """The receiver's process, once its HTTP port answers."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", url, str(port), str(port + 1)],
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port + 1), timeout=1).close()
            return child
        except OSError:
            if time.monotonic() > deadline:
                child.kill()
                raise
            time.sleep(0.2)


def batches(n: int, instance: str) -> list[list[ReadableSpan]]:
    """n batches of 512 SDK spans: traces of a server span and three children."""
    mem = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "bench", "ctrlmesh.instance.id": instance})
    )
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("bench")
    for i in range(n * BATCH // 4):
        with tracer.start_as_current_span(
            "GET /items/{id}", kind=SpanKind.SERVER, attributes={"http.route": "/items/{id}", "n": i}
        ):
            for name in ("auth", "SELECT items", "render"):
                with tracer.start_as_current_span(name, attributes={"step": name}):
                    pass
    spans = list(mem.get_finished_spans())
    return [spans[i : i + BATCH] for i in range(0, n * BATCH, BATCH)]


def ingest(make: Any, work: list[list[list[ReadableSpan]]]) -> tuple[float, int]:
    """Export every thread's batches at once; (seconds, spans accepted)."""
    ok = [0] * len(work)
    errors: list[str] = []

    def worker(i: int) -> None:
        exporter = make()
        for b in work[i]:
            r = exporter.export(b)
            if r.name == "SUCCESS":
                ok[i] += len(b)
            else:
                errors.append(r.name)
        exporter.shutdown()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(work))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"exports failed: {errors[:5]}")
    return elapsed, sum(ok)


async def seed(t: Telemetry, instance: str, tenant: str, n: int) -> float:
    """n spans by COPY through the store: traces of 10 spans spread over the last 23 hours."""
    now = datetime.now(UTC)
    rnd = random.Random(7)
    started = time.perf_counter()
    chunk: list[tuple[Any, ...]] = []
    res = json.dumps({"service.name": "bench", "ctrlmesh.instance.id": instance})
    for k in range(n // 10):
        trace = f"{rnd.getrandbits(128):032x}"
        start = now - timedelta(seconds=rnd.uniform(60, 23 * 3600))
        root = f"{rnd.getrandbits(64):016x}"
        dur = rnd.randint(1_000_000, 500_000_000)
        chunk.append(
            (
                tenant,
                instance,
                trace,
                root,
                "",
                True,
                "GET /",
                "server",
                "ok",
                "",
                start,
                dur,
                '{"k": 1}',
                res,
                "b",
            )
        )
        for j in range(9):
            chunk.append(
                (tenant, instance, trace, f"{rnd.getrandbits(64):016x}", root, False, f"step {j}", "internal",
                 "ok", "", start + timedelta(milliseconds=j), dur // 10, '{"j": 1}', res, "b")
            )  # fmt: skip
        if len(chunk) >= 100_000 or k == n // 10 - 1:
            await t.store.write_spans(chunk)
            chunk = []
    async with t.store.db.engine.begin() as conn:
        await conn.execute(text("ANALYZE instances.telemetry_spans"))
    return time.perf_counter() - started


async def timed(fn: Any, runs: int) -> dict[str, float]:
    lat = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()
        lat.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(statistics.median(lat), 2), "p95_ms": round(percentile(lat, 95), 2)}


def table(r: dict[str, Any]) -> str:
    q = r["traces_query_1m_spans"]
    rows = [
        "| OTLP receiver | figure |",
        "|---|---|",
        f"| spans/s ingested, OTLP/HTTP protobuf ({r['exporters']} SDK exporters, batches of 512) | "
        f"{r['ingest_http']['spans_per_s']:,.0f} |",
        f"| spans/s ingested, OTLP/gRPC (same) | {r['ingest_grpc']['spans_per_s']:,.0f} |",
        f"| `/traces` query, 1 M spans stored: newest 20 traces of the last hour, p50 / p95 | "
        f"{q['default']['p50_ms']} / {q['default']['p95_ms']} ms |",
        f"| same, last 24 h with `min_duration=400ms`, p50 / p95 | "
        f"{q['min_duration_24h']['p50_ms']} / {q['min_duration_24h']['p95_ms']} ms |",
        f"| same, one `trace_id`, p50 / p95 | {q['trace_id']['p50_ms']} / {q['trace_id']['p95_ms']} ms |",
        f"| seeding 1 M spans by COPY | {r['seed_spans_per_s']:,.0f} spans/s |",
        f"\n{r['machine']}; `bench/otlp.py`, {r['date']}.",
    ]
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="ctrlmesh-bench-otlp-")), port=free_block(1))
    pg.start()
    child: subprocess.Popen[bytes] | None = None
    try:
        pg.create_database("bench")
        url = pg.url_for("bench")
        db = Database(make_engine(url))
        await migrate(db.engine, "instances", MIGRATIONS)
        port = free_block(2)
        t = Telemetry(db, settings(port, port + 1))
        now = datetime.now(UTC)
        async with db.session() as s:
            for iid in ("inst_ingest", "inst_big"):
                await s.execute(
                    text(
                        "INSERT INTO instances.instances (id, tenant_id, name, slug, provider_name, state, "
                        "created_at, updated_at) VALUES (:i, 'ten_bench', :i, :i, 'docker', 'running', :t, :t)"
                    ),
                    {"i": iid, "t": now},
                )
        token = await t.tokens.issue("inst_ingest", "ten_bench", "rel_1")
        headers = {"x-ctrlmesh-otlp-token": token}
        child = start_receiver(url, port)
        work = [batches(args.batches, "inst_ingest") for _ in range(args.exporters)]
        # Warm-up: partitions made, connections open, code paths hot.
        ingest(
            lambda: OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port + 1}/v1/traces", headers=headers),
            [w[:2] for w in work],
        )
        http_s, http_n = ingest(
            lambda: OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port + 1}/v1/traces", headers=headers), work
        )
        grpc_s, grpc_n = ingest(
            lambda: GrpcSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True, headers=headers), work
        )
        async with db.session() as s:
            stored = (
                await s.execute(
                    text("SELECT count(*) FROM instances.telemetry_spans WHERE instance_id = 'inst_ingest'")
                )
            ).scalar_one()
        expected = http_n + grpc_n + sum(len(b) for w in work for b in w[:2])
        if stored != expected:
            raise SystemExit(f"stored {stored} spans, sent {expected}")
        seed_s = await seed(t, "inst_big", "ten_bench", args.seed)
        q = t.queries
        now = datetime.now(UTC)
        sample = await q.traces(
            "inst_big", since=now - timedelta(hours=1), trace_id="", min_duration=None, limit=1
        )
        some_trace = sample[0].trace_id
        queries = {
            "default": await timed(
                lambda: q.traces("inst_big", since=datetime.now(UTC) - timedelta(hours=1), trace_id="",
                                 min_duration=None, limit=20),
                args.queries,
            ),
            "min_duration_24h": await timed(
                lambda: q.traces("inst_big", since=datetime.now(UTC) - timedelta(hours=24), trace_id="",
                                 min_duration=timedelta(milliseconds=400), limit=20),
                args.queries,
            ),
            "trace_id": await timed(
                lambda: q.traces("inst_big", since=datetime.now(UTC) - timedelta(days=7), trace_id=some_trace,
                                 min_duration=None, limit=20),
                args.queries,
            ),
        }  # fmt: skip
        await db.dispose()
        return {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"load average {os.getloadavg()[0]:.1f} at the end",
            "exporters": args.exporters,
            "batch": BATCH,
            "ingest_http": {
                "spans": http_n,
                "seconds": round(http_s, 3),
                "spans_per_s": round(http_n / http_s),
            },
            "ingest_grpc": {
                "spans": grpc_n,
                "seconds": round(grpc_s, 3),
                "spans_per_s": round(grpc_n / grpc_s),
            },
            "seed_spans": args.seed,
            "seed_spans_per_s": round(args.seed / seed_s),
            "traces_query_1m_spans": queries,
        }
    finally:
        if child is not None:
            child.terminate()
            child.wait(10)
        pg.destroy()


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--exporters", type=int, default=4)
    ap.add_argument("--batches", type=int, default=30, help="batches of 512 spans per exporter")
    ap.add_argument("--seed", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--no-readme", action="store_true", help="write the JSON only")
    args = ap.parse_args()
    results = asyncio.run(run(args))
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "otlp.json").write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_readme:
        write_block("otlp", table(results))
    sys.stdout.write(json.dumps(results, indent=2) + "\n" + table(results) + "\n")


if __name__ == "__main__":
    main()
