"""Instances benchmark: how long an instance takes from POST to running and healthy, and how
long a rolling deploy of 3 replicas takes, on a real Docker engine (the test engine and images).

    .venv/bin/python bench/instances.py [--runs 5]

Writes bench/results/instances.json and the table under "Benchmarks" in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from bench.readme import write_block  # noqa: E402
from tests.fixtures.mesh import Mesh, start_mesh  # noqa: E402

IMAGE = "ctrlmesh-test/httpd"


def sh(script: str, env: dict[str, str]) -> str:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / script)], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def poll(fetch: Any, done: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fetch()
        if done(value):
            return value
        time.sleep(0.05)
    raise TimeoutError(str(value)[:500])


def add_http_check(c: Any, instance_id: str) -> None:
    """The health check both measurements wait on: GET /healthz every second."""
    c.post(
        f"/v1/instances/{instance_id}/health/checks",
        json={
            "name": "http",
            "type": "http",
            "target": "http://localhost:8080/healthz",
            "interval": "1s",
            "timeout": "1s",
        },
    )


def create_to_healthy(m: Mesh, tenant: str) -> tuple[float, float]:
    c = m.admin()
    started = time.perf_counter()
    inst = c.post(
        "/v1/instances",
        json={
            "tenant_id": tenant,
            "name": "bench",
            "image": f"{IMAGE}:v1",
            "provider_name": "docker",
            "resources": {"cpu_millis": 100, "memory_mb": 32},
            "ports": [{"container_port": 8080, "protocol": "tcp"}],
        },
    ).json()
    add_http_check(c, inst["id"])
    poll(lambda: c.get(f"/v1/instances/{inst['id']}").json()["state"], lambda s: s == "running")
    running = time.perf_counter() - started
    poll(lambda: c.get(f"/v1/instances/{inst['id']}/health").json()["status"], lambda s: s == "healthy")
    healthy = time.perf_counter() - started
    c.delete(f"/v1/instances/{inst['id']}")
    poll(lambda: c.get(f"/v1/instances/{inst['id']}").status_code, lambda code: code == 404)
    return running, healthy


def rolling_deploys(m: Mesh, tenant: str, runs: int) -> list[float]:
    c = m.admin()
    inst = c.post(
        "/v1/instances",
        json={
            "tenant_id": tenant,
            "name": "bench-rolling",
            "image": f"{IMAGE}:v1",
            "replicas": 3,
            "resources": {"cpu_millis": 100, "memory_mb": 32},
            "ports": [{"container_port": 8080, "protocol": "tcp"}],
        },
    ).json()
    add_http_check(c, inst["id"])
    poll(lambda: c.get(f"/v1/instances/{inst['id']}").json()["state"], lambda s: s == "running")
    out = []
    for i in range(runs):
        image = f"{IMAGE}:{'v2' if i % 2 == 0 else 'v1'}"
        started = time.perf_counter()
        dep = c.post(
            f"/v1/instances/{inst['id']}/deploy", json={"image": image, "strategy": "rolling"}
        ).json()
        url = f"/v1/deployments/{dep['id']}"
        done = poll(lambda url=url: c.get(url).json(), lambda d: d["state"] in ("succeeded", "failed"))
        if done["state"] != "succeeded":
            raise RuntimeError(done)
        out.append(time.perf_counter() - started)
    c.delete(f"/v1/instances/{inst['id']}")
    poll(lambda: c.get(f"/v1/instances/{inst['id']}").status_code, lambda code: code == 404)
    return out


def table(results: dict[str, Any]) -> str:
    rows = [
        "| Instances (docker provider, busybox httpd image) | median | runs |",
        "|---|---|---|",
    ]
    for key, label in (
        ("create_to_running_s", "create → running (endpoint answers)"),
        ("create_to_healthy_s", "create → running and healthy (http check, 1 s interval)"),
        ("rolling_deploy_3_replicas_s", "rolling deploy, 3 replicas, health-gated"),
    ):
        r = results[key]
        rows.append(f"| {label} | {r['median']:.2f} s | {len(r['runs'])} |")
    rows.append(f"\n{results['machine']}; `bench/instances.py`, {results['date']}.")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    env = dict(os.environ, CTRLMESH_DOCKER_SWARM="1")
    host = sh("docker-up.sh", env).splitlines()[-1]
    sh("test-images.sh", dict(env, DOCKER_HOST=host))
    m = start_mesh(
        {
            "DOCKER_HOST": host,
            "CTRLMESH_PROVIDERS": "docker",
            "CTRLMESH_DOCKER_PULL": "false",
            "CTRLMESH_INSTANCE_STOP_TIMEOUT": "1s",
        }
    )
    try:
        tenant = (
            m.admin()
            .post(
                "/v1/admin/tenants",
                json={
                    "name": f"bench-{int(time.time())}",
                    "quota": {"max_instances": 10, "max_cpu_millis": 8000, "max_memory_mb": 8192},
                },
            )
            .json()["id"]
        )
        created = [create_to_healthy(m, tenant) for _ in range(args.runs)]
        deploys = rolling_deploys(m, tenant, max(3, args.runs // 2 + 1))
    finally:
        m.stop()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Docker engine at {host}",
        "create_to_running_s": {
            "median": statistics.median(r for r, _ in created),
            "runs": [round(r, 3) for r, _ in created],
        },
        "create_to_healthy_s": {
            "median": statistics.median(h for _, h in created),
            "runs": [round(h, 3) for _, h in created],
        },
        "rolling_deploy_3_replicas_s": {
            "median": statistics.median(deploys),
            "runs": [round(d, 3) for d in deploys],
        },
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "instances.json").write_text(json.dumps(results, indent=2) + "\n")
    write_block("instances", table(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
