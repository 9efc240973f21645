"""The ingress's rendering rules, without a Caddy: hostnames, path order, weights, the 503 of an
instance that is not running, and tenancy of explicit hostnames."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from services.network.ingress.inputs import Challenge, HostBinding, TlsCertificate
from services.network.ingress.render import (
    BUCKETS,
    HTTP_SERVER,
    HTTPS_SERVER,
    Listen,
    Snapshot,
    bucket_below,
    render,
    split,
)
from services.network.repository import InstanceRow, RouteRow

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LISTEN = Listen(bind="127.0.0.1", http_port=8880, https_port=8443, admin="127.0.0.1:2019", domain="localhost")


def inst(
    iid: str, slug: str, *, tenant: str = "ten_a", state: str = "running", ports: tuple[int, ...] = (8000,)
) -> InstanceRow:
    return InstanceRow(
        instance_id=iid,
        tenant_id=tenant,
        account_id="acct",
        tenant_slug=tenant.removeprefix("ten_"),
        slug=slug,
        state=state,
        main_service="main",
        ports=[{"container_port": 8080, "protocol": "tcp"}],
        upstreams=[{"service": "main", "container_port": 8080, "host_port": p} for p in ports],
        updated_at=T0,
    )


def route(
    rid: str,
    iid: str,
    path: str,
    *,
    tenant: str = "ten_a",
    weight: int = 100,
    strip: bool = False,
    hostname: str = "",
    protocol: str = "http",
) -> RouteRow:
    return RouteRow(rid, tenant, "acct", iid, "", path, 8080, protocol, weight, strip, hostname, T0, T0)


def host_block(cfg: dict[str, Any], host: str, server: str = HTTP_SERVER) -> list[dict[str, Any]]:
    for r in cfg["apps"]["http"]["servers"][server]["routes"]:
        if r.get("match") == [{"host": [host]}]:
            return list(r["handle"][0]["routes"])
    raise AssertionError(f"no block for {host}")


def test_default_hostname_proxies_to_every_replica_of_the_first_port():
    """With no route, <instance>.<tenant>.<domain>/ goes to every live replica; unknown hosts 404."""
    cfg = render(Snapshot([inst("inst_1", "web", ports=(31001, 31002))], []), LISTEN)
    block = host_block(cfg, "web.a.localhost")
    proxy = block[0]["handle"][-1]
    assert proxy["handler"] == "reverse_proxy"
    assert proxy["upstreams"] == [{"dial": "127.0.0.1:31001"}, {"dial": "127.0.0.1:31002"}]
    assert proxy["load_balancing"]["retry_match"] and proxy["health_checks"]["passive"]
    assert cfg["apps"]["http"]["servers"][HTTP_SERVER]["automatic_https"] == {"disable": True}
    assert cfg["admin"] == {"listen": "127.0.0.1:2019", "config": {"persist": False}}
    assert HTTPS_SERVER not in cfg["apps"]["http"]["servers"]


def test_paths_longest_first_strip_prefix_and_grpc():
    """Longer paths match first; strip_prefix rewrites; grpc speaks h2c to the upstream."""
    snap = Snapshot(
        [inst("inst_1", "web")],
        [
            route("rte_1", "inst_1", "/"),
            route("rte_2", "inst_1", "/api/", strip=True),
            route("rte_3", "inst_1", "/g", protocol="grpc"),
        ],
    )
    block = host_block(render(snap, LISTEN), "web.a.localhost")
    assert [r.get("match") for r in block[:3]] == [
        [{"path": ["/api", "/api/*"]}],
        [{"path": ["/g", "/g/*"]}],
        None,
    ]
    assert block[0]["handle"][0] == {"handler": "rewrite", "strip_path_prefix": "/api"}
    assert block[1]["handle"][0]["transport"]["versions"] == ["h2c", "2"]
    assert block[-1]["handle"][0]["status_code"] == 404


def test_stopped_instance_answers_503_json():
    """A route of an instance that is not running is a 503 with the JSON error body."""
    block = host_block(
        render(Snapshot([inst("inst_1", "web", state="stopped", ports=())], []), LISTEN), "web.a.localhost"
    )
    resp = block[0]["handle"][0]
    assert (
        resp["status_code"] == 503 and '"error": "Unavailable"' in resp["body"] and "stopped" in resp["body"]
    )


def test_split_buckets_follow_the_weights():
    """Weights become consecutive ranges of 256 buckets, and the regexes match exactly those."""
    assert split([90, 10]) == [230, 256]
    assert split([1, 1, 1])[-1] == BUCKETS
    for n in (0, 1, 15, 16, 17, 128, 230, 255):
        rx = re.compile(bucket_below(n))
        assert [b for b in range(BUCKETS) if rx.match(f"{b:02x}-rest")] == list(range(n)), n


def test_same_hostname_and_path_split_across_instances_of_one_tenant():
    """Two instances' routes on one hostname and path share it by weight; another tenant cannot
    take that hostname; a weight-0 route takes nothing."""
    shop = "shop.a.localhost"
    snap = Snapshot(
        [
            inst("inst_1", "v1", ports=(1,)),
            inst("inst_2", "v2", ports=(2,)),
            inst("inst_3", "x", tenant="ten_b", ports=(3,)),
        ],
        [
            route("rte_1", "inst_1", "/", weight=90, hostname=shop),
            route("rte_2", "inst_2", "/", weight=10, hostname=shop),
            route("rte_3", "inst_3", "/", tenant="ten_b", hostname=shop),
            route("rte_4", "inst_1", "/z", weight=0, hostname=shop),
        ],
    )
    block = host_block(render(snap, LISTEN), shop)
    choices = block[0]["handle"][0]["routes"]
    assert len(choices) == 2
    assert choices[0]["match"] == [{"expression": "{http.request.uuid}.matches('^([0-d][0-9a-f]|e[0-5])')"}]
    dials = [c["handle"][-1]["upstreams"] for c in choices]
    assert dials == [[{"dial": "127.0.0.1:1"}], [{"dial": "127.0.0.1:2"}]]
    assert len(block) == 2  # the split and the 404: no /z, no foreign route


def test_verified_hosts_certificates_and_challenges():
    """A verified domain routes to its instance on HTTP and (with a certificate) HTTPS; challenges
    answer on any host before anything else."""
    snap = Snapshot(
        [inst("inst_1", "web")],
        [],
        hosts=[
            HostBinding("app.example.com", "inst_1", "ten_a"),
            HostBinding("evil.example.com", "inst_1", "ten_b"),
        ],
        certificates=[TlsCertificate("app.example.com", "CERT", "KEY")],
        challenges=[Challenge("tok", "tok.thumb")],
    )
    cfg = render(snap, LISTEN)
    first = cfg["apps"]["http"]["servers"][HTTP_SERVER]["routes"][0]
    assert first["match"] == [{"path": ["/.well-known/acme-challenge/tok"]}]
    assert first["handle"][0]["body"] == "tok.thumb"
    host_block(cfg, "app.example.com")
    host_block(cfg, "app.example.com", HTTPS_SERVER)
    hosts = [r.get("match") for r in cfg["apps"]["http"]["servers"][HTTP_SERVER]["routes"]]
    assert [{"host": ["evil.example.com"]}] not in hosts
    assert cfg["apps"]["tls"]["certificates"]["load_pem"] == [
        {"certificate": "CERT", "key": "KEY", "tags": ["app.example.com"]}
    ]
