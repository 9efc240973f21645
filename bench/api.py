"""API benchmark: a soak of concurrent clients mixing reads and writes across the API families
that have logic, then the edge's cost (GET /v2/dbs/{id} through the edge versus the same RPC
called directly over gRPC with a signed principal, at the same concurrency).

    .venv/bin/python bench/api.py [--duration 120] [--clients 16] [--ratio-seconds 15]

`--routes` measures the request path instead, one route family at a time under `wrk` (its own
CPU is small beside the mesh's): GET by id, a list, a cheap mutation and /health, each at 1 and
16 connections (req/s, p50, p99, and each process's CPU per request), and GET by id directly
over gRPC under `h2load` (HTTP/2, a signed principal, the same connections) for the edge ÷
direct ratio. `--baseline REV` runs the same measurements against a mesh of that revision (a
temporary git worktree on this virtualenv, its stubs generated) started beside this one, the two
alternating for `--rounds` rounds; the figures are the medians. `--profile` then samples every
process with py-spy under the 16-connection GET and keeps each one's top frames.

    .venv/bin/python bench/api.py --routes [--baseline 9e9bbb5] [--rounds 3] [--seconds 8] [--profile]

The mesh is what `make run` starts (embedded PostgreSQL, every service, the edge), through the
launcher; with a Docker engine (`scripts/docker-up.sh`) Ctrl Plane instances join the mix.
Zectre's `/api/v1` joins with its reads (clusters, nodes, templates, stats, managed databases,
platform config; its writes make databases and instances, which the other families already
exercise). Afterwards every
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


ZECTRE_READS = (
    "/api/v1/clusters",
    "/api/v1/nodes",
    "/api/v1/templates",
    "/api/v1/stats",
    "/api/v1/managed-databases",
    "/api/v1/platform/config",
)


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
        elif roll < 0.985:
            # Zectre: the platform's clusters, nodes, templates, stats and managed databases.
            path = rng.choice(ZECTRE_READS)
            await self.call(self.http, "zectre", "GET", path, (200,))
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
        + "). Zectre `/api/v1` is in the mix with its reads.",
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


# -- --routes: the request path, one route family at a time, side by side with a baseline -------

WRK_LUA = ROOT / "bench" / "wrk.lua"
CONNECTIONS = (1, 16)
# The processes whose CPU is read around each run ("postgres" is the embedded server and its
# backends); the services' gRPC ports and pid files are named after them.
PROCESSES = ("edge", "accounts", "databases", "instances", "network", "clusters", "postgres")
LIST_SIZE = 20
CONTACT = {"email": "bench@example.com", "name": "Bench", "company": "Bench Co"}


def install(component: str) -> None:
    """The project's own idempotent installer (scripts/install-system-deps.sh)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "install-system-deps.sh"), component], check=True)


@dataclass
class Subject:
    """One mesh under test and what the routes need in it."""

    name: str
    root: Path
    mesh: Mesh
    key: str = ""
    tenant: str = ""
    db_id: str = ""
    principal: Any = None
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def routes(self) -> dict[str, tuple[str, str, str]]:
        """family → (method, path, JSON body)."""
        return {
            "get": ("GET", f"/v2/dbs/{self.db_id}", ""),
            "list": ("GET", f"/v2/tenants/{self.tenant}/dbs?limit={LIST_SIZE}", ""),
            "mutation": ("POST", "/v2/account/contact", json.dumps(CONTACT)),
            "health": ("GET", "/health", ""),
        }


FAMILY_LABELS = {
    "get": "`GET /v2/dbs/{id}`",
    "list": f"`GET /v2/tenants/{{t}}/dbs?limit={LIST_SIZE}`",
    "mutation": "`POST /v2/account/contact`",
    "health": "`GET /health`",
    "direct": "`GetDatabaseById` directly over gRPC",
}


def prepare(s: Subject) -> None:
    """An account of its own with one tenant of LIST_SIZE databases (a full list page)."""
    m = s.mesh
    sys_md = principals.sign(principals.system_principal("bench"), m.internal_secret)

    async def account() -> tuple[str, Any]:
        async with grpc.aio.insecure_channel(m.grpc_target("accounts")) as ch:
            resp = await accounts_pb2_grpc.AccountServiceStub(ch).CreateAccount(
                accounts_pb2.CreateAccountRequest(
                    email=f"bench{time.time_ns()}@example.com", name="Bench", plan="standard_payg"
                ),
                metadata=sys_md,
            )
            key = str(resp.api_key.key)
            p = await accounts_pb2_grpc.ApiKeyServiceStub(ch).Authenticate(
                accounts_pb2.AuthenticateRequest(token=key), metadata=sys_md
            )
        return key, p

    s.key, s.principal = asyncio.run(account())
    s.tenant = f"benchroutes{int(time.time())}"
    with m.client(s.key, timeout=120) as c:
        r = c.post("/v2/tenants", json={"name": s.tenant})
        assert r.status_code == 201, r.text
        for i in range(LIST_SIZE):
            r = c.post(f"/v2/tenants/{s.tenant}/dbs", json={"name": f"db{i}", "size": "L1"})
            assert r.status_code == 201, r.text
            s.db_id = s.db_id or r.json()["db_id"]
        for _, (method, path, body) in s.routes().items():
            r = c.request(method, path, content=body or None, headers={"Content-Type": "application/json"})
            assert r.status_code == 200, (method, path, r.status_code, r.text)
        assert len(c.get(s.routes()["list"][1]).json()["items"]) == LIST_SIZE


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (FileNotFoundError, IndexError, ValueError):
                continue
    return out


def process_pids(m: Mesh) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for name in PROCESSES[:-1]:
        pid = m.pid(name)
        pids[name] = [pid] if pid else []
    named = {p for ps in pids.values() for p in ps} | {m.pid(n) for n in ("caddy", "pggateway")}
    pg = [p for p in m.pids() if p not in named]
    pids["postgres"] = pg + [c for p in pg for c in _children(p)]
    return pids


def cpu_snapshot(m: Mesh) -> dict[str, dict[int, float]]:
    return {name: {p: _cpu_seconds(p) for p in ps} for name, ps in process_pids(m).items()}


def cpu_per_request(before: dict[str, dict[int, float]], m: Mesh, requests: int) -> dict[str, float]:
    """ms of CPU per request of each process over a run, pid by pid (PostgreSQL's backends come
    and go; one that exited during the run is missed, one that started counts whole)."""
    after = cpu_snapshot(m)
    return {
        name: round(
            sum(t - before.get(name, {}).get(p, 0.0) for p, t in pids.items()) * 1e3 / max(requests, 1), 3
        )
        for name, pids in after.items()
    }


def run_wrk(url: str, method: str, key: str, body: str, connections: int, seconds: float) -> dict[str, Any]:
    env = dict(os.environ, BENCH_METHOD=method, BENCH_KEY=key, BENCH_BODY=body)
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(WRK_LUA), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH-RESULT "))
    raw = json.loads(line.split(" ", 1)[1])
    errors = sum(raw[k] for k in raw if k.endswith("_errors") or k == "timeouts")
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
        "errors": errors,
    }


def _grpc_ok_count(m: Mesh, method: str) -> float:
    """The databases service's own count of `method` answered OK (its Prometheus page)."""
    port = int(m.env["CTRLMESH_DATABASES_PORT"]) + int(m.env["CTRLMESH_METRICS_PORT_OFFSET"])
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ctrlmesh_grpc_server_requests_total{") and f'method="{method}"' in line:
            if 'code="OK"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def run_direct(s: Subject, concurrency: int, seconds: float) -> dict[str, Any]:
    """GetDatabaseById straight to the databases service under h2load, with the principal the
    edge would sign for the same key, `concurrency` calls at once on one HTTP/2 connection (as
    the edge's one channel carries them); the service's own OK count must grow by every request."""
    import base64
    import re
    import tempfile

    m = s.mesh
    md = principals.sign(s.principal, m.internal_secret)
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    for k, v in md:
        value = base64.b64encode(v).decode() if isinstance(v, bytes) else v
        headers += ["-H", f"{k}: {value}"]
    msg = databases_pb2.GetDatabaseByIdRequest(db_id=s.db_id).SerializeToString()
    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        body.write(b"\0" + len(msg).to_bytes(4, "big") + msg)
        body.flush()
        url = f"http://{m.grpc_target('databases')}/ctrlmesh.databases.v1.DatabaseService/GetDatabaseById"
        before = _grpc_ok_count(m, "GetDatabaseById")
        cmd = ["h2load", "-t1", "-c1", f"-m{concurrency}", f"-D{seconds:g}", "--warm-up-time=1"]
        out = subprocess.run(
            [*cmd, "-d", body.name, *headers, url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
        ok = _grpc_ok_count(m, "GetDatabaseById") - before
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    rate = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", out)
    if not (done and rate and mean):
        raise RuntimeError(f"unreadable h2load output:\n{out}")
    succeeded = int(done.group(2))
    # Warm-up requests are answered too but not counted by h2load: OK must cover the rest.
    if ok < succeeded or succeeded == 0:
        raise RuntimeError(f"h2load: {succeeded} answered, but the service counted {ok:.0f} OK")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[mean.group(2)]
    return {
        "requests": succeeded,
        "rps": float(rate.group(1)),
        "mean_ms": float(mean.group(1)) * scale,
        "errors": 0,
    }


def measure_round(s: Subject, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for family, (method, path, body) in s.routes().items():
        for c in CONNECTIONS:
            before = cpu_snapshot(s.mesh)
            r = run_wrk(s.mesh.base_url + path, method, s.key, body, c, seconds)
            r["cpu_ms_per_request"] = cpu_per_request(before, s.mesh, r["requests"])
            out[f"{family}@{c}"] = r
    for c in CONNECTIONS:
        before = cpu_snapshot(s.mesh)
        r = run_direct(s, c, seconds)
        r["cpu_ms_per_request"] = cpu_per_request(before, s.mesh, r["requests"])
        out[f"direct@{c}"] = r
    for c in CONNECTIONS:
        out[f"edge_over_direct@{c}"] = {"ratio": out[f"get@{c}"]["rps"] / out[f"direct@{c}"]["rps"]}
    return out


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    import statistics

    out: dict[str, Any] = {}
    for cell in rounds[0]:
        merged: dict[str, Any] = {}
        for metric, value in rounds[0][cell].items():
            if isinstance(value, dict):
                merged[metric] = {k: statistics.median(r[cell][metric][k] for r in rounds) for k in value}
            else:
                merged[metric] = statistics.median(r[cell][metric] for r in rounds)
        out[cell] = merged
    return out


def checkout(rev: str) -> Path:
    """A temporary worktree of `rev` on this virtualenv, its protobuf stubs generated."""
    import tempfile

    where = Path(tempfile.mkdtemp(prefix=f"ctrlmesh-bench-{rev[:12]}-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev],
        check=True,
        capture_output=True,
    )
    (where / ".venv").symlink_to((ROOT / ".venv").resolve())
    subprocess.run([str(where / ".venv" / "bin" / "python"), "scripts/genproto.py"], cwd=where, check=True)
    return where


def remove_checkout(where: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)


def profile(s: Subject, seconds: float) -> dict[str, Any]:
    """py-spy on every process under the 16-connection GET by id: each process's share of
    samples per thread and its top frames, by own time and including callees."""
    import tempfile

    method, path, body = s.routes()["get"]
    pids = {k: v[0] for k, v in process_pids(s.mesh).items() if v and k != "postgres"}
    spy = str(Path(sys.executable).parent / "py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="ctrlmesh-bench-profile-"))
    procs = {
        name: subprocess.Popen(
            [
                spy,
                "record",
                "-p",
                str(pid),
                "-d",
                f"{seconds:g}",
                "-r",
                "200",
                "-f",
                "raw",
                "--threads",
                "--nonblocking",
                "-o",
                str(tmp / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    }
    time.sleep(0.5)
    run_wrk(s.mesh.base_url + path, method, s.key, body, 16, seconds)
    out: dict[str, Any] = {}
    for name, p in procs.items():
        p.wait(timeout=seconds + 60)
        f = tmp / f"{name}.txt"
        if f.exists():
            out[name] = summarize_profile(f.read_text())
    return out


def summarize_profile(raw: str, top: int = 12) -> dict[str, Any]:
    """py-spy's collapsed stacks (`thread;outer;...;inner count`) → shares of the samples."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    n = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        n += k
        threads[frames[0]] += k
        calls = [f for f in frames[1:] if f]
        if calls:
            own[calls[-1]] += k
            for f in set(calls):
                total[f] += k

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * v / n, 1)) for f, v in c.most_common(top)]

    return {"samples": n, "threads": share(threads), "own": share(own), "total": share(total)}


def routes_table(r: dict[str, Any]) -> str:
    subjects = r["subjects"]
    names = list(subjects)
    head = " | ".join(f"{n} req/s | p50 | p99" for n in names)
    rows = [
        f"| Route ({r['seconds']:g} s per run, medians of {r['rounds']} alternating rounds) | clients | {head} |",
        "|---|---" + "|---" * (3 * len(names)) + "|",
    ]
    for family in ("get", "list", "mutation", "health", "direct"):
        for c in CONNECTIONS:
            cells = []
            for n in names:
                x = subjects[n]["medians"][f"{family}@{c}"]
                p50 = f"{x['p50_ms']:.1f} ms" if "p50_ms" in x else f"{x['mean_ms']:.1f} ms (mean)"
                p99 = f"{x['p99_ms']:.1f} ms" if "p99_ms" in x else ""
                cells.append(f"{x['rps']:,.0f} | {p50} | {p99}")
            rows.append(f"| {FAMILY_LABELS[family]} | {c} | " + " | ".join(cells) + " |")
    for c in CONNECTIONS:
        cells = [f"{subjects[n]['medians'][f'edge_over_direct@{c}']['ratio']:.2f}x | |" for n in names]
        rows.append(f"| edge ÷ direct (GET by id) | {c} | " + " | ".join(cells) + " |")
    rows += [
        "",
        "CPU per `GET /v2/dbs/{id}` at 16 connections (ms, all processes' user + system time):",
        "",
        "| process | " + " | ".join(names) + " |",
        "|---" + "|---" * len(names) + "|",
    ]
    for proc in PROCESSES:
        cells = [f"{subjects[n]['medians']['get@16']['cpu_ms_per_request'][proc]:.2f}" for n in names]
        rows.append(f"| {proc} | " + " | ".join(cells) + " |")
    rows += [
        "",
        f"{r['machine']} (load average {r['load_average']}); `wrk` (one thread) and `h2load` share the "
        "machine with the meshes; each subject is a `make run` mesh with embedded defaults, started "
        f"side by side. `bench/api.py --routes`, {r['date']}.",
    ]
    return "\n".join(rows)


def routes_main(args: argparse.Namespace) -> None:
    install("wrk")
    install("h2load")
    env = {"CTRLMESH_LOG_LEVEL": "WARNING"}
    subjects: list[Subject] = []
    base_root: Path | None = None
    try:
        if args.baseline:
            rev = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            base_root = checkout(rev)
            subjects.append(Subject(f"baseline {rev}", base_root, start_mesh(env, root=base_root)))
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "-uno"], capture_output=True, text=True
        ).stdout
        here = f"this tree {head}{'+' if dirty.strip() else ''}"
        subjects.append(Subject(here, ROOT, start_mesh(env)))
        for variant in args.variant or ():
            key, _, value = variant.partition("=")
            subjects.append(Subject(f"{here} {key}={value}", ROOT, start_mesh({**env, key: value})))
        for s in subjects:
            prepare(s)
        load_before = os.getloadavg()[0]
        for s in subjects:  # warm caches, connections and the JIT-less interpreters' first calls
            for method, path, body in s.routes().values():
                run_wrk(s.mesh.base_url + path, method, s.key, body, 16, 2)
        for i in range(args.rounds):
            # Alternate the order so a drift of the machine's load falls on both sides alike.
            for s in subjects if i % 2 == 0 else reversed(subjects):
                s.rounds.append(measure_round(s, args.seconds))
                log_round(s, i)
        profiles = {s.name: profile(s, args.seconds) for s in subjects} if args.profile else {}
        load_after = os.getloadavg()[0]
    finally:
        for s in subjects:
            s.mesh.stop()
            s.mesh.cleanup()
        if base_root is not None:
            remove_checkout(base_root)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "load_average": f"{load_before:.1f} → {load_after:.1f}",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "subjects": {s.name: {"medians": medians(s.rounds), "rounds": s.rounds} for s in subjects},
        "profile": profiles,
    }
    out = ROOT / "bench" / "results" / "api.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous["routes"] = results
    out.write_text(json.dumps(previous, indent=2) + "\n")
    write_block("api-routes", routes_table(results))
    sys.stdout.write(routes_table(results) + "\n")
    errors = sum(cell.get("errors", 0) for s in subjects for r in s.rounds for cell in r.values())
    sys.exit(0 if errors == 0 else 1)


def log_round(s: Subject, i: int) -> None:
    r = s.rounds[-1]
    brief = ", ".join(f"{k} {v['rps']:.0f}/s" for k, v in r.items() if "rps" in v)
    sys.stderr.write(f"round {i + 1} {s.name}: {brief}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=float(os.environ.get("CTRLMESH_BENCH_DURATION", 120)))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--ratio-seconds", type=float, default=15)
    ap.add_argument("--no-docker", action="store_true")
    ap.add_argument("--routes", action="store_true", help="the request path per route family under wrk")
    ap.add_argument("--baseline", help="--routes: also measure a mesh of this git revision, alternating")
    ap.add_argument(
        "--variant",
        action="append",
        metavar="KEY=VALUE",
        help="--routes: also measure this tree with one setting changed (e.g. CTRLMESH_EVENT_LOOP=asyncio)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--profile", action="store_true", help="--routes: py-spy every process afterwards")
    args = ap.parse_args()
    if args.routes:
        routes_main(args)
        return
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
    families = "SPG99 /v2 + Ctrl Plane /v1 + Zectre /api/v1" + (
        " incl. instances" if host else " (no Docker: no instances)"
    )
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
