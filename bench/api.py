"""API benchmark: a soak of concurrent clients mixing reads and writes across the API families
that have logic, then the edge's cost (GET /v2/dbs/{id} through the edge versus the same RPC
called directly over gRPC with a signed principal, at the same concurrency).

    .venv/bin/python bench/api.py [--duration 120] [--clients 16] [--ratio-seconds 15]

The mesh is what `make run` starts (embedded PostgreSQL, every service, the edge), through the
launcher; with a Docker engine (`scripts/docker-up.sh`) Ctrl Plane instances join the mix.
Zectre's `/api/v1` answers 501 today and is left out (noted in the table). Afterwards every
family's lists must hold exactly what the clients created and did not delete. Writes
bench/results/api.json and the table under "Benchmarks" in README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import grpc  # noqa: E402
import httpx  # noqa: E402
from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc  # noqa: E402
from ctrlmesh.databases.v1 import databases_pb2, databases_pb2_grpc  # noqa: E402

from bench.readme import write_block  # noqa: E402
from libs import principal as principals  # noqa: E402
from tests.fixtures.mesh import Mesh, start_mesh  # noqa: E402

IMAGE = "ctrlmesh-test/httpd:v1"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


@dataclass
class Stats:
    reads: list[float] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    by_family: Counter[str] = field(default_factory=Counter)


@dataclass
class Owned:
    """What one client created and has not deleted: the exact counts checked at the end."""

    db_tenant: str = ""
    dbs: dict[str, str] = field(default_factory=dict)  # name → db_id
    deleting_dbs: set[str] = field(default_factory=set)  # db_ids
    bare_tenants: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    admin_tenants: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)
    deleting_instances: set[str] = field(default_factory=set)
    # A create or delete that answered 5xx (an overloaded machine's deadline): its outcome is
    # unknown to the client, so it is left out of the exact counts and reported beside them.
    unknown_dbs: set[str] = field(default_factory=set)  # names
    unknown_instances: set[str] = field(default_factory=set)  # ids (a failed delete)


class Client:
    """One soak client: its own resources, so deletes never race another client's creates."""

    def __init__(
        self, n: int, run: str, http: httpx.AsyncClient, admin: httpx.AsyncClient, stats: Stats, env: Any
    ):
        self.n, self.run, self.http, self.admin, self.stats, self.env = n, run, http, admin, stats, env
        self.owned = Owned()
        self.seq = 0
        self.rng = random.Random(n)

    def name(self, kind: str) -> str:
        self.seq += 1
        return f"b{self.run}{kind}{self.n}x{self.seq}"

    async def call(
        self, c: httpx.AsyncClient, family: str, method: str, path: str, ok: tuple[int, ...], **kw: Any
    ) -> httpx.Response:
        started = time.perf_counter()
        r = await c.request(method, path, **kw)
        elapsed = time.perf_counter() - started
        (self.stats.reads if method == "GET" else self.stats.writes).append(elapsed)
        self.stats.statuses[str(r.status_code)] += 1
        self.stats.by_family[family] += 1
        if r.status_code not in ok:
            self.stats.unexpected.append(f"{method} {path} → {r.status_code} {r.text[:200]}")
        return r

    async def setup(self, heavy: asyncio.Semaphore) -> None:
        self.owned.db_tenant = self.name("t")
        await self.call(
            self.http, "spg99", "POST", "/v2/tenants", (201,), json={"name": self.owned.db_tenant}
        )
        async with heavy:  # database storage is made at create: not 16 at once in the setup
            await self.create_db()

    async def create_db(self) -> None:
        name = self.name("d")
        r = await self.call(
            self.http,
            "spg99",
            "POST",
            f"/v2/tenants/{self.owned.db_tenant}/dbs",
            (201,),
            json={"name": name, "size": "L1"},
        )
        if r.status_code == 201:
            self.owned.dbs[name] = r.json()["db_id"]
        elif r.status_code >= 500:
            self.owned.unknown_dbs.add(name)

    async def step(self) -> None:
        o, rng = self.owned, self.rng
        roll = rng.random()
        t = o.db_tenant
        if roll < 0.12:
            await self.call(self.http, "spg99", "GET", f"/v2/tenants/{t}", (200,))
        elif roll < 0.24 and o.dbs:
            await self.call(self.http, "spg99", "GET", f"/v2/dbs/{rng.choice(list(o.dbs.values()))}", (200,))
        elif roll < 0.32:
            await self.call(self.http, "spg99", "GET", f"/v2/tenants/{t}/dbs", (200,), params={"limit": 50})
        elif roll < 0.38:
            await self.call(self.http, "spg99", "GET", "/v2/tenants", (200,), params={"limit": 20})
        elif roll < 0.43:
            await self.call(self.http, "spg99", "GET", "/v2/api-keys", (200,))
        elif roll < 0.50 and o.admin_tenants:
            await self.call(
                self.admin, "ctrlplane", "GET", f"/v1/admin/tenants/{rng.choice(o.admin_tenants)}", (200,)
            )
        elif roll < 0.55:
            await self.call(self.admin, "ctrlplane", "GET", "/v1/admin/tenants", (200,), params={"limit": 20})
        elif roll < 0.60 and self.env.instances:
            path = f"/v1/instances/{rng.choice(o.instances)}" if o.instances else "/v1/instances"
            await self.call(self.env.inst_client, "ctrlplane", "GET", path, (200,))
        # Writes.
        elif roll < 0.66:
            if len(o.bare_tenants) < 3:
                name = self.name("t")
                r = await self.call(self.http, "spg99", "POST", "/v2/tenants", (201,), json={"name": name})
                if r.status_code == 201:
                    o.bare_tenants.append(name)
            else:
                name = o.bare_tenants.pop(rng.randrange(len(o.bare_tenants)))
                await self.call(self.http, "spg99", "DELETE", f"/v2/tenants/{name}", (204,))
        elif roll < 0.74:
            if len(o.keys) < 4:
                r = await self.call(
                    self.http,
                    "spg99",
                    "POST",
                    "/v2/api-keys",
                    (201,),
                    json={"name": self.name("k"), "scope": "account"},
                )
                if r.status_code == 201:
                    o.keys.append(r.json()["id"])
            else:
                kid = o.keys.pop(rng.randrange(len(o.keys)))
                await self.call(self.http, "spg99", "DELETE", f"/v2/api-keys/{kid}", (204,))
        elif roll < 0.86:
            if len(o.admin_tenants) < 3:
                r = await self.call(
                    self.admin,
                    "ctrlplane",
                    "POST",
                    "/v1/admin/tenants",
                    (201,),
                    json={"name": self.name("a")},
                )
                if r.status_code == 201:
                    o.admin_tenants.append(r.json()["id"])
            elif rng.random() < 0.5:
                tid = rng.choice(o.admin_tenants)
                await self.call(
                    self.admin, "ctrlplane", "PATCH", f"/v1/admin/tenants/{tid}", (200,), json={"plan": "pro"}
                )
            else:
                tid = o.admin_tenants.pop(rng.randrange(len(o.admin_tenants)))
                await self.call(self.admin, "ctrlplane", "DELETE", f"/v1/admin/tenants/{tid}", (204,))
        elif roll < 0.93:
            # Databases are the heaviest write (a timeline each): few of them.
            if len(o.dbs) < 3:
                await self.create_db()
            else:
                name = rng.choice(list(o.dbs))
                db_id = o.dbs.pop(name)
                r = await self.call(self.http, "spg99", "DELETE", f"/v2/tenants/{t}/dbs/{name}", (202,))
                if r.status_code == 202:
                    o.deleting_dbs.add(db_id)
                elif r.status_code >= 500:
                    o.unknown_dbs.add(name)
        elif roll < 0.96 and self.env.instances:
            if len(o.instances) < 1:
                r = await self.call(
                    self.env.inst_client,
                    "ctrlplane",
                    "POST",
                    "/v1/instances",
                    (201,),
                    json={
                        "name": self.name("i").replace("x", "-"),
                        "image": IMAGE,
                        "provider_name": "docker",
                        "resources": {"cpu_millis": 50, "memory_mb": 32},
                        "ports": [{"container_port": 8080, "protocol": "tcp"}],
                    },
                )
                if r.status_code == 201:
                    o.instances.append(r.json()["id"])
            else:
                iid = o.instances.pop()
                r = await self.call(
                    self.env.inst_client, "ctrlplane", "DELETE", f"/v1/instances/{iid}", (202,)
                )
                if r.status_code == 202:
                    o.deleting_instances.add(iid)
                elif r.status_code >= 500:
                    o.unknown_instances.add(iid)
        else:
            await self.call(self.http, "spg99", "GET", "/v2/api-keys/me", (200,))


@dataclass
class Env:
    instances: bool
    inst_client: httpx.AsyncClient | None = None


async def soak(
    m: Mesh, account_key: str, instance_key: str | None, seconds: float, clients: int
) -> dict[str, Any]:
    stats = Stats()
    run = format(int(time.time()) % 100000, "05d")
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    kw: dict[str, Any] = {"base_url": m.base_url, "timeout": 60, "limits": limits}
    async with (
        httpx.AsyncClient(headers={"Authorization": f"Bearer {account_key}"}, **kw) as http,
        httpx.AsyncClient(headers={"Authorization": f"Bearer {m.admin_key}"}, **kw) as admin,
        httpx.AsyncClient(headers={"Authorization": f"Bearer {instance_key}"}, **kw) as inst,
    ):
        env = Env(instance_key is not None, inst)
        workers = [Client(i, run, http, admin, stats, env) for i in range(clients)]
        heavy = asyncio.Semaphore(2)
        await asyncio.gather(*(w.setup(heavy) for w in workers))
        stats.reads.clear()
        stats.writes.clear()
        deadline = time.monotonic() + seconds

        async def loop(w: Client) -> None:
            while time.monotonic() < deadline:
                await w.step()

        started = time.monotonic()
        await asyncio.gather(*(loop(w) for w in workers))
        elapsed = time.monotonic() - started
        counts = await verify(m, run, workers, http, admin, inst)
    total = len(stats.reads) + len(stats.writes)
    five = sum(n for s, n in stats.statuses.items() if s.startswith("5"))
    return {
        "seconds": round(elapsed, 1),
        "clients": clients,
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "families": dict(stats.by_family),
        "statuses": dict(stats.statuses),
        "5xx": five,
        "unexpected": stats.unexpected[:20],
        "unexpected_count": len(stats.unexpected),
        "get_ms": {
            "n": len(stats.reads),
            "p50": percentile(stats.reads, 50) * 1e3,
            "p99": percentile(stats.reads, 99) * 1e3,
        },
        "mutation_ms": {
            "n": len(stats.writes),
            "p50": percentile(stats.writes, 50) * 1e3,
            "p99": percentile(stats.writes, 99) * 1e3,
        },
        "counts": counts,
    }


async def _wait_gone(c: httpx.AsyncClient, paths: list[str], limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    pending = list(paths)
    while pending:
        if time.monotonic() > deadline:
            raise AssertionError(f"still there after {limit_s}s: {pending[:5]}")
        pending = [p for p in pending if (await c.get(p)).status_code != 404]
        await asyncio.sleep(0.2)


async def _all_pages(c: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor, offset = "", 0
    while True:
        q = dict(params, limit=100)
        if path.startswith("/v2/"):
            q["offset"] = offset
        elif cursor:
            q["cursor"] = cursor
        body = (await c.get(path, params=q)).json()
        items += body["items"]
        offset += len(body["items"])
        cursor = body.get("next_cursor", "")
        if (path.startswith("/v2/") and (not body["items"] or offset >= body["total"])) or (
            not path.startswith("/v2/") and not cursor
        ):
            return items


async def verify(
    m: Mesh,
    run: str,
    workers: list[Client],
    http: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    inst: httpx.AsyncClient,
) -> dict[str, Any]:
    """Every list holds exactly what the clients created and kept; deleted ones are gone."""
    await _wait_gone(http, [f"/v2/dbs/{d}" for w in workers for d in w.owned.deleting_dbs])
    await _wait_gone(inst, [f"/v1/instances/{i}" for w in workers for i in w.owned.deleting_instances])
    want_tenants = {w.owned.db_tenant for w in workers} | {t for w in workers for t in w.owned.bare_tenants}
    got_tenants = {t["name"] for t in await _all_pages(http, "/v2/tenants")}
    want_dbs = {(w.owned.db_tenant, n) for w in workers for n in w.owned.dbs}
    unknown_dbs = {(w.owned.db_tenant, n) for w in workers for n in w.owned.unknown_dbs}
    got_dbs = set()
    for w in workers:
        got_dbs |= {
            (w.owned.db_tenant, d["name"])
            for d in await _all_pages(http, f"/v2/tenants/{w.owned.db_tenant}/dbs")
        }
    want_keys = {k for w in workers for k in w.owned.keys}
    me = (await http.get("/v2/api-keys/me")).json()["id"]
    got_keys = {k["id"] for k in (await http.get("/v2/api-keys")).json()["items"]} - {me}
    want_admin = {t for w in workers for t in w.owned.admin_tenants}
    got_admin = {
        t["id"] for t in await _all_pages(admin, "/v1/admin/tenants") if t["name"].startswith(f"b{run}a")
    }
    want_inst = {i for w in workers for i in w.owned.instances}
    got_inst = (
        {i["id"] for i in await _all_pages(inst, "/v1/instances")} if workers[0].env.instances else set()
    )
    # A create or delete that answered 5xx may or may not have happened: out of the comparison.
    unknown_inst = {i for w in workers for i in w.owned.unknown_instances}
    unknown = {"databases": len(unknown_dbs), "instances": len(unknown_inst)}
    got_dbs -= unknown_dbs
    got_inst -= unknown_inst
    checks = {
        "spg99 tenants": (len(want_tenants), want_tenants == got_tenants),
        "spg99 databases": (len(want_dbs), want_dbs == got_dbs),
        "api keys": (len(want_keys), want_keys == got_keys),
        "admin tenants": (len(want_admin), want_admin == got_admin),
        "instances": (len(want_inst), want_inst == got_inst),
    }
    out: dict[str, Any] = {k: {"expected": n, "exact": ok} for k, (n, ok) in checks.items()}
    out["outcome unknown to the client (answered 5xx), left out"] = unknown
    return out


async def edge_vs_direct(m: Mesh, key: str, db_id: str, seconds: float, clients: int) -> dict[str, Any]:
    """Requests/s of GET /v2/dbs/{id} through the edge and of GetDatabaseById over gRPC, signed
    with the principal the edge would send for the same key (one fresh signature per call, as
    the edge does)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=m.base_url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30
    ) as c:

        async def edge_once() -> None:
            r = await c.get(f"/v2/dbs/{db_id}")
            if r.status_code != 200:
                raise RuntimeError(r.text)

        edge = await _drive(edge_once, seconds, clients)
    async with grpc.aio.insecure_channel(m.grpc_target("accounts")) as ach:
        p = await accounts_pb2_grpc.ApiKeyServiceStub(ach).Authenticate(
            accounts_pb2.AuthenticateRequest(token=key),
            metadata=principals.sign(principals.system_principal("bench"), m.internal_secret),
        )
    secret = m.internal_secret
    async with grpc.aio.insecure_channel(m.grpc_target("databases")) as ch:
        stub = databases_pb2_grpc.DatabaseServiceStub(ch)
        req = databases_pb2.GetDatabaseByIdRequest(db_id=db_id)

        async def direct_once() -> None:
            await stub.GetDatabaseById(req, metadata=principals.sign(p, secret), timeout=30)

        direct = await _drive(direct_once, seconds, clients)
    return {
        "clients": clients,
        "seconds": seconds,
        "edge_rps": edge["rps"],
        "direct_rps": direct["rps"],
        "edge_over_direct": edge["rps"] / direct["rps"],
        "edge_p50_ms": edge["p50_ms"],
        "direct_p50_ms": direct["p50_ms"],
    }


async def _drive(once: Any, seconds: float, clients: int) -> dict[str, float]:
    for _ in range(50):  # warm connections and caches
        await once()
    lat: list[float] = []
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            await once()
            lat.append(time.perf_counter() - t0)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return {"rps": len(lat) / (time.monotonic() - started), "p50_ms": percentile(lat, 50) * 1e3}


def docker_host() -> str | None:
    """The test engine (started if needed) with the test images, or None without Docker."""
    env = dict(os.environ, CTRLMESH_DOCKER_SWARM="1")
    try:
        host = (
            subprocess.run(
                ["bash", str(ROOT / "scripts" / "docker-up.sh")],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "test-images.sh")],
            env=dict(env, DOCKER_HOST=host),
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, IndexError):
        return None
    return host


def table(r: dict[str, Any]) -> str:
    s, e = r["soak"], r["edge"]
    checked = {k: v for k, v in s["counts"].items() if "exact" in v}
    counts = ", ".join(f"{k} {v['expected']}" for k, v in checked.items())
    exact = all(v["exact"] for v in checked.values())
    unknown = s["counts"].get("outcome unknown to the client (answered 5xx), left out", {})
    rows = [
        f"| API soak ({s['clients']} clients, {s['seconds']:.0f} s, {r['families']}) | n | p50 | p99 |",
        "|---|---|---|---|",
        f"| GETs | {s['get_ms']['n']:,} | {s['get_ms']['p50']:.1f} ms | {s['get_ms']['p99']:.1f} ms |",
        f"| mutations | {s['mutation_ms']['n']:,} | {s['mutation_ms']['p50']:.1f} ms | {s['mutation_ms']['p99']:.1f} ms |",
        "",
        f"{s['requests']:,} requests ({s['requests_per_s']:.0f}/s), **{s['5xx']} 5xx**, "
        f"{s['unexpected_count']} answers other than the expected status (5xx included); counts afterwards "
        f"{'exact' if exact else 'NOT exact'} ({counts}"
        + (f"; left out, outcome unknown after a 5xx: {unknown}" if any(unknown.values()) else "")
        + "). Zectre `/api/v1` answers 501 today and is not in the mix.",
        "",
        f"| `GET /v2/dbs/{{id}}`, {e['clients']} concurrent clients | requests/s | p50 |",
        "|---|---|---|",
        f"| through the edge (HTTP/JSON → gRPC) | {e['edge_rps']:,.0f} | {e['edge_p50_ms']:.1f} ms |",
        f"| the same RPC directly over gRPC (signed principal) | {e['direct_rps']:,.0f} | {e['direct_p50_ms']:.1f} ms |",
        f"| edge / direct | {e['edge_over_direct']:.2f}x | |",
        "",
        f"{r['machine']} (load average {r['load_average']}); load generator, edge, services and PostgreSQL "
        "share the machine; "
        f"`bench/api.py`, {r['date']}.",
    ]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=float(os.environ.get("CTRLMESH_BENCH_DURATION", 120)))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--ratio-seconds", type=float, default=15)
    ap.add_argument("--no-docker", action="store_true")
    args = ap.parse_args()
    host = None if args.no_docker else docker_host()
    env = {"CTRLMESH_LOG_LEVEL": "WARNING"}
    if host:
        env.update(
            {
                "DOCKER_HOST": host,
                "CTRLMESH_PROVIDERS": "docker",
                "CTRLMESH_DOCKER_PULL": "false",
                "CTRLMESH_INSTANCE_STOP_TIMEOUT": "1s",
            }
        )
    m = start_mesh(env)
    load_before = os.getloadavg()[0]
    try:
        # An account of its own: the soak's SPG99 lists hold only what it made.
        sys_md = principals.sign(principals.system_principal("bench"), m.internal_secret)

        async def new_account() -> str:
            async with grpc.aio.insecure_channel(m.grpc_target("accounts")) as ch:
                resp = await accounts_pb2_grpc.AccountServiceStub(ch).CreateAccount(
                    accounts_pb2.CreateAccountRequest(
                        email=f"bench{time.time_ns()}@example.com", name="Bench", plan="standard_payg"
                    ),
                    metadata=sys_md,
                )
            return str(resp.api_key.key)

        account_key = asyncio.run(new_account())
        instance_key = None
        admin = m.admin()
        if host:
            name = f"benchinst{int(time.time())}"
            t = admin.post(
                "/v1/admin/tenants",
                json={
                    "name": name,
                    "quota": {"max_instances": 64, "max_cpu_millis": 64000, "max_memory_mb": 65536},
                },
            )
            k = admin.post(
                "/v2/api-keys",
                json={
                    "name": "bench",
                    "scope": "tenant",
                    "tenant": name,
                    "permissions": {"can_delete": True},
                },
            )
            assert t.status_code == 201 and k.status_code == 201, (t.text, k.text)
            instance_key = k.json()["key"]
        soaked = asyncio.run(soak(m, account_key, instance_key, args.duration, args.clients))
        probe = httpx.Client(base_url=m.base_url, headers={"Authorization": f"Bearer {account_key}"})
        tname = f"benchratio{int(time.time())}"
        assert probe.post("/v2/tenants", json={"name": tname}).status_code == 201
        db_id = probe.post(f"/v2/tenants/{tname}/dbs", json={"name": "ratio", "size": "L1"}).json()["db_id"]
        edge = asyncio.run(edge_vs_direct(m, account_key, db_id, args.ratio_seconds, args.clients))
    finally:
        m.stop()
        m.cleanup()
    families = "SPG99 /v2 + Ctrl Plane /v1" + (" incl. instances" if host else " (no Docker: no instances)")
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "families": families,
        "load_average": " → ".join(f"{x:.1f}" for x in (load_before, os.getloadavg()[0])),
        "soak": soaked,
        "edge": edge,
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "api.json").write_text(json.dumps(results, indent=2) + "\n")
    write_block("api", table(results))
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    ok = (
        soaked["5xx"] == 0
        and soaked["unexpected_count"] == 0
        and all(v["exact"] for v in soaked["counts"].values() if "exact" in v)
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
