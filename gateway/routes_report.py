"""`make routes`: every REST route with its status — done, untested or 501.

A route is **done** when its gRPC method is implemented by a servicer (it overrides the
generated base method) and the end-to-end suite has exercised it through the edge with an
answer other than 501 (the test session records the edge's per-route counters into
the route-hits file the e2e suite writes (`HITS`, in the temporary directory)). Implemented but not yet exercised is **untested**; the rest answer 501.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import sys
import tempfile
from pathlib import Path

import services
from gateway.routes import Route, load_routes

ROOT = Path(__file__).resolve().parent.parent
# Where the e2e suite records the routes it exercised: outside the repository, so a test run
# changes no file of it (CTRLMESH_ROUTE_HITS moves it).
HITS = Path(os.environ.get("CTRLMESH_ROUTE_HITS") or Path(tempfile.gettempdir()) / "ctrlmesh-route-hits.json")


def implemented_methods() -> set[str]:
    """'/pkg.Service/Method' for every method a servicer in services/ really implements."""
    done: set[str] = set()
    for mod in pkgutil.walk_packages(services.__path__, "services."):
        if "servicer" not in mod.name.rsplit(".", 1)[-1]:
            continue
        module = importlib.import_module(mod.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            for base in cls.__mro__[1:]:
                if not base.__name__.endswith("Servicer") or not base.__module__.endswith("_pb2_grpc"):
                    continue
                grpc_mod = sys.modules[base.__module__]
                pb2 = importlib.import_module(base.__module__.removesuffix("_grpc"))
                svc = pb2.DESCRIPTOR.services_by_name.get(base.__name__.removesuffix("Servicer"))
                if svc is None:
                    continue
                del grpc_mod
                for m in svc.methods:
                    if m.name in cls.__dict__ or any(
                        m.name in k.__dict__ for k in cls.__mro__[1 : cls.__mro__.index(base)]
                    ):
                        done.add(f"/{svc.full_name}/{m.name}")
    return done


def status_of(route: Route, implemented: set[str], hits: set[str]) -> str:
    if route.grpc_path not in implemented:
        return "501"
    return "done" if f"{route.http_method} {route.template}" in hits else "untested"


def main() -> None:
    routes = load_routes()
    implemented = implemented_methods()
    hits = set(json.loads(HITS.read_text())) if HITS.exists() else set()
    rows = sorted(routes, key=lambda r: (r.template.split("/")[1:3], r.template, r.http_method))
    counts: dict[str, int] = {}
    out = ["| Route | Service | Status |", "|---|---|---|"]
    for r in rows:
        st = status_of(r, implemented, hits)
        counts[st] = counts.get(st, 0) + 1
        out.append(f"| `{r.http_method} {r.template}` | {r.service} | {st} |")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    sys.stdout.write(
        f"{len(routes)} routes: {summary}"
        + ("" if HITS.exists() else " (run `make test` to record e2e coverage)")
        + "\n\n"
    )
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
