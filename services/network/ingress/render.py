"""The whole Caddy configuration, rendered from the network schema's snapshot: a pure function,
so what Caddy should hold is decided in one place and tested without a Caddy.

Shape (Caddy's JSON, loaded whole through POST /load):
- the HTTP server (and, once a certificate is loaded, the HTTPS server) on the ingress's bind
  address, with automatic HTTPS off: certificates come only from the domains package;
- first, every pending ACME HTTP-01 challenge, on any host;
- then one route per hostname: every instance answers at `<instance>.<tenant>.<domain>` and at
  each of its verified domains; inside, one route per path, longest first; a path's routes split
  its traffic by weight;
- a host or path nobody routes answers 404, an instance that is not running 503, each with the
  platform's JSON error body.

Weights: Caddy 2.6 has no weighted selection policy. Each request draws one uniform byte (the
first two hex digits of its `{http.request.uuid}`, which Caddy computes once per request) and
the routes of a path take consecutive ranges of the 256 values in proportion to their weights
(`expression` matchers on that prefix).

Upstreams are the live replicas of the routed service and port; retries (`try_duration` for a
refused dial, `retry_match` for idempotent methods) and passive health checks move a request
off a replica that is leaving, so a rolling deploy drops none.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from libs.caddy import bootstrap_config
from services.network.ingress.inputs import Challenge, HostBinding, TlsCertificate
from services.network.repository import InstanceRow, RouteRow

BUCKETS = 256
HTTP_SERVER = "ingress_http"
HTTPS_SERVER = "ingress_https"
TRY_DURATION = "5s"
TRY_INTERVAL = "50ms"
FAIL_DURATION = "3s"


@dataclass(frozen=True)
class Listen:
    bind: str
    http_port: int
    https_port: int
    # host:port of Caddy's own admin endpoint (kept as it is: loading moves nothing).
    admin: str
    domain: str


@dataclass
class Snapshot:
    instances: list[InstanceRow]
    routes: list[RouteRow]
    hosts: list[HostBinding] = field(default_factory=list)
    certificates: list[TlsCertificate] = field(default_factory=list)
    challenges: list[Challenge] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    """One way to answer a host+path: a route (or an instance's default) with its weight."""

    instance: InstanceRow
    service: str
    port: int
    protocol: str
    weight: int
    strip_prefix: bool


def default_hostname(inst: InstanceRow, domain: str) -> str:
    return f"{inst.slug}.{inst.tenant_slug}.{domain}".lower()


def _json_error(status: int, reason: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    return {
        "handler": "static_response",
        "status_code": status,
        "headers": {"Content-Type": ["application/json"]},
        "body": json.dumps({"error": reason, "message": message, "details": details}, sort_keys=True),
    }


def bucket_below(n: int) -> str:
    """A regular expression matching a lowercase hex string whose first two digits are < n."""
    if n >= BUCKETS:
        return "^[0-9a-f]{2}"
    hi, lo = divmod(n, 16)
    digits = "0123456789abcdef"
    parts = []
    if hi:
        parts.append(f"[{digits[0]}-{digits[hi - 1]}][0-9a-f]")
    if lo:
        parts.append(f"{digits[hi]}[{digits[0]}-{digits[lo - 1]}]")
    return "^(" + "|".join(parts) + ")" if parts else "^$"


def split(weights: list[int]) -> list[int]:
    """Cumulative bucket bounds for `weights` (largest-remainder rounding; the last is 256)."""
    total = sum(weights)
    exact = [w * BUCKETS / total for w in weights]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)[
        : BUCKETS - sum(shares)
    ]:
        shares[i] += 1
    out, acc = [], 0
    for s in shares:
        acc += s
        out.append(acc)
    return out


def _upstreams(e: _Entry) -> list[dict[str, str]]:
    return [
        {"dial": f"127.0.0.1:{u['host_port']}"}
        for u in sorted(e.instance.upstreams, key=lambda u: u["host_port"])
        if u["service"] == e.service and u["container_port"] == e.port
    ]


def _proxy(e: _Entry, path: str) -> list[dict[str, Any]]:
    handlers: list[dict[str, Any]] = []
    if e.strip_prefix and path != "/":
        handlers.append({"handler": "rewrite", "strip_path_prefix": path})
    proxy: dict[str, Any] = {
        "handler": "reverse_proxy",
        "upstreams": _upstreams(e),
        "load_balancing": {
            "selection_policy": {"policy": "round_robin"},
            "try_duration": TRY_DURATION,
            "try_interval": TRY_INTERVAL,
            "retry_match": [{"method": ["GET", "HEAD", "OPTIONS"]}],
        },
        "health_checks": {"passive": {"fail_duration": FAIL_DURATION, "max_fails": 1}},
    }
    if e.protocol == "grpc":
        proxy["transport"] = {"protocol": "http", "versions": ["h2c", "2"]}
    handlers.append(proxy)
    return handlers


def _unavailable(e: _Entry) -> dict[str, Any]:
    inst = e.instance
    details = {"instance_id": inst.instance_id, "state": inst.state}
    if inst.state != "running":
        return _json_error(503, "Unavailable", f"instance {inst.slug} is not running ({inst.state})", details)
    return _json_error(503, "Unavailable", f"instance {inst.slug} has no running replica", details)


def _path_route(path: str, entries: list[_Entry]) -> dict[str, Any] | None:
    weighted = [e for e in entries if e.weight > 0]
    if not weighted:
        return None
    live = [e for e in weighted if e.instance.state == "running" and _upstreams(e)]
    if not live:
        handle = [_unavailable(weighted[0])]
    elif len(live) == 1:
        handle = _proxy(live[0], path)
    else:
        bounds = split([e.weight for e in live])
        choices: list[dict[str, Any]] = []
        for i, (e, bound) in enumerate(zip(live, bounds, strict=True)):
            choice: dict[str, Any] = {"handle": _proxy(e, path), "terminal": True}
            if i < len(live) - 1:
                pattern = bucket_below(bound)
                choice["match"] = [{"expression": f"{{http.request.uuid}}.matches('{pattern}')"}]
            choices.append(choice)
        handle = [{"handler": "subroute", "routes": choices}]
    route: dict[str, Any] = {"handle": handle, "terminal": True}
    if path != "/":
        route["match"] = [{"path": [path, f"{path}/*"]}]
    return route


def _norm_path(path: str) -> str:
    return path.rstrip("/") or "/"


def _host_routes(snap: Snapshot, domain: str) -> dict[str, dict[str, list[_Entry]]]:
    """hostname → path → the entries answering it."""
    by_id = {i.instance_id: i for i in snap.instances}
    own: dict[str, list[str]] = {i.instance_id: [default_hostname(i, domain)] for i in snap.instances}
    owner = {default_hostname(i, domain): i.tenant_id for i in snap.instances}
    for h in snap.hosts:
        inst = by_id.get(h.instance_id)
        if inst is None or inst.tenant_id != h.tenant_id:
            continue
        name = h.hostname.lower().rstrip(".")
        own[inst.instance_id].append(name)
        owner.setdefault(name, inst.tenant_id)
    routed: set[str] = set()
    out: dict[str, dict[str, list[_Entry]]] = {}

    def add(host: str, path: str, e: _Entry) -> None:
        out.setdefault(host, {}).setdefault(_norm_path(path), []).append(e)

    for r in snap.routes:
        inst = by_id.get(r.instance_id)
        if inst is None:
            continue
        e = _Entry(inst, r.service_name or inst.main_service, r.port, r.protocol, r.weight, r.strip_prefix)
        if r.hostname:
            name = r.hostname.lower()
            # A name another tenant holds (its instance's, or its verified domain) is not taken.
            if owner.setdefault(name, inst.tenant_id) != inst.tenant_id:
                continue
            add(name, r.path, e)
        else:
            routed.add(inst.instance_id)
            for host in own[inst.instance_id]:
                add(host, r.path, e)
    for inst in snap.instances:
        if inst.instance_id in routed or not inst.ports:
            continue
        first = inst.ports[0]
        protocol = "grpc" if first.get("protocol") == "grpc" else "http"
        e = _Entry(inst, inst.main_service, int(first["container_port"]), protocol, 100, False)
        for host in own[inst.instance_id]:
            add(host, "/", e)
    return out


def _server_routes(snap: Snapshot, domain: str, *, challenges: bool) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = []
    if challenges:
        for c in sorted(snap.challenges, key=lambda c: c.token):
            routes.append(
                {
                    "match": [{"path": [f"/.well-known/acme-challenge/{c.token}"]}],
                    "handle": [
                        {
                            "handler": "static_response",
                            "status_code": 200,
                            "headers": {"Content-Type": ["text/plain"]},
                            "body": c.key_authorization,
                        }
                    ],
                    "terminal": True,
                }
            )
    for host, paths in sorted(_host_routes(snap, domain).items()):
        inner = []
        for path in sorted(paths, key=lambda p: (-len(p), p)):
            r = _path_route(path, paths[path])
            if r is not None:
                inner.append(r)
        inner.append({"handle": [_json_error(404, "NotFound", "no route for this path", {"host": host})]})
        routes.append(
            {
                "match": [{"host": [host]}],
                "handle": [{"handler": "subroute", "routes": inner}],
                "terminal": True,
            }
        )
    routes.append({"handle": [_json_error(404, "NotFound", "no instance is routed at this hostname", {})]})
    return routes


def _certificates(certs: Iterable[TlsCertificate]) -> list[dict[str, Any]]:
    return [
        {"certificate": c.cert_pem, "key": c.key_pem, "tags": [c.hostname]}
        for c in sorted(certs, key=lambda c: c.hostname)
    ]


def render(snap: Snapshot, listen: Listen) -> dict[str, Any]:
    """The complete Caddy config for `snap`."""
    servers: dict[str, Any] = {
        HTTP_SERVER: {
            "listen": [f"{listen.bind}:{listen.http_port}"],
            "automatic_https": {"disable": True},
            "routes": _server_routes(snap, listen.domain, challenges=True),
        }
    }
    apps: dict[str, Any] = {
        "http": {"http_port": listen.http_port, "https_port": listen.https_port, "servers": servers}
    }
    if snap.certificates:
        servers[HTTPS_SERVER] = {
            "listen": [f"{listen.bind}:{listen.https_port}"],
            "automatic_https": {"disable": True},
            "tls_connection_policies": [{}],
            "routes": _server_routes(snap, listen.domain, challenges=False),
        }
        apps["tls"] = {"certificates": {"load_pem": _certificates(snap.certificates)}}
    return {**bootstrap_config(listen.admin), "apps": apps}
