"""Chaos benchmark: 20 rounds (by default) of `kill -9` of the databases service during a create,
a delete and a compute boot and during a live handoff, of accounts during a tenant's cascade
delete, of the instances service during a deploy and an instance delete, of network while a
certificate is being issued by Pebble, and of clusters during a managed-database create and a
template instantiation, on a mesh whose launcher restarts them; each round checks that the
platform kept serving, every operation converged, and nothing is duplicated or orphaned
(tests/fixtures/chaos.py holds the rounds; tests/e2e/test_chaos.py runs 5 of each in the suite).

    .venv/bin/python bench/chaos.py [--rounds 20]

Needs a Docker engine for the instance rounds (`scripts/docker-up.sh`, started if needed) and
Pebble for the certificate rounds (installed by scripts/install-system-deps.sh if missing).
Writes bench/results/chaos.json and the table under "Benchmarks" in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from bench.readme import write_block  # noqa: E402
from tests.fixtures.acme import start_pebble  # noqa: E402
from tests.fixtures.chaos import (  # noqa: E402
    CHAOS_ENV,
    CertificateChaos,
    ClustersChaos,
    DatabaseChaos,
    HandoffChaos,
    InstanceChaos,
    RoundResult,
    TenantChaos,
    pebble_env,
)
from tests.fixtures.dns import start_dns  # noqa: E402
from tests.fixtures.instances import MESH_ENV  # noqa: E402
from tests.fixtures.mesh import free_port, start_mesh  # noqa: E402


def docker_host() -> str:
    env = dict(os.environ, CTRLMESH_DOCKER_SWARM="1")
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "docker-up.sh")], env=env, check=True, capture_output=True, text=True
    )
    host = out.stdout.strip().splitlines()[-1]
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "test-images.sh")],
        env=dict(env, DOCKER_HOST=host),
        check=True,
        capture_output=True,
    )
    return host


def summary(results: list[RoundResult]) -> dict[str, Any]:
    kills_in: Counter[str] = Counter()
    for r in results:
        for op, state in r.checks["states at kill"].items():
            kills_in[f"{op} {state}"] += 1
    return {
        "rounds": len(results),
        "restart_s": {
            "median": statistics.median(r.restart_s for r in results),
            "max": max(r.restart_s for r in results),
        },
        "converge_s": {
            "median": statistics.median(r.converge_s for r in results),
            "max": max(r.converge_s for r in results),
        },
        "kills_landed_in": dict(kills_in),
        "outcomes": [
            r.checks.get("outcomes") or r.checks.get("deployment") or r.checks.get("outcome") for r in results
        ],
    }


def table(r: dict[str, Any]) -> str:
    rows = [
        "| `kill -9` under a long operation (all rounds converged, no duplicate, no orphan) | rounds | "
        "kill → serving again (median / max) | kill → all converged (median / max) | where the kills landed |",
        "|---|---|---|---|---|",
    ]
    for key, label in (
        ("databases", "databases: create in `creating` + delete after 202 + compute boot on first connect"),
        ("accounts", "accounts: tenant cascade delete after 202 (an open PG connection keeps answering)"),
        ("instances", "instances: rolling deploy after 201 + instance delete after 202"),
        ("handoff", "databases: live handoff L1 ⇄ L2 under a committing client (no commit lost)"),
        ("network", "network: certificate issuance from Pebble, challenge published (exactly one issued)"),
        ("clusters", "clusters: managed-database create + template instantiate in flight (no orphan)"),
    ):
        s = r[key]
        landed = ", ".join(f"{k}: {n}" for k, n in sorted(s["kills_landed_in"].items()))
        rows.append(
            f"| {label} | {s['rounds']} | {s['restart_s']['median']:.1f} s / {s['restart_s']['max']:.1f} s | "
            f"{s['converge_s']['median']:.1f} s / {s['converge_s']['max']:.1f} s | {landed} |"
        )
    rows.append(
        f"\n{r['machine']}; the launcher restarts a dead service after 0.05 s; most of the time to serving "
        f"again is the Python service starting; `bench/chaos.py`, {r['date']}."
    )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    host = docker_host()
    dns, stop_dns = start_dns()
    pebble = start_pebble(Path(tempfile.mkdtemp(prefix="ctrlmesh-pebble-")), free_port(), dns)
    m = start_mesh({**MESH_ENV, **CHAOS_ENV, **pebble_env(pebble, dns.address), "DOCKER_HOST": host})
    try:
        dbs = DatabaseChaos(m)
        db_rounds = [dbs.round() for _ in range(args.rounds)]
        tenants = TenantChaos(m)
        try:
            tenant_rounds = [tenants.round() for _ in range(args.rounds)]
        finally:
            tenants.close()
        inst = InstanceChaos(m, host)
        try:
            inst_rounds = [inst.round() for _ in range(args.rounds)]
        finally:
            inst.close()
        handoff = HandoffChaos(m)
        handoff_rounds = [handoff.round() for _ in range(args.rounds)]
        certs = CertificateChaos(m, dns.zone, pebble.root_pem())
        try:
            cert_rounds = [certs.round() for _ in range(args.rounds)]
        finally:
            certs.close()
        zectre = ClustersChaos(m)
        clusters_rounds = [zectre.round() for _ in range(args.rounds)]
    finally:
        m.stop()
        m.cleanup()
        pebble.proc.terminate()
        pebble.proc.wait(10)
        stop_dns()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "databases": summary(db_rounds),
        "accounts": summary(tenant_rounds),
        "instances": summary(inst_rounds),
        "handoff": summary(handoff_rounds),
        "network": summary(cert_rounds),
        "clusters": summary(clusters_rounds),
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "chaos.json").write_text(json.dumps(results, indent=2) + "\n")
    write_block("chaos", table(results))
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
