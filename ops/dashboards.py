"""`python -m ops.dashboards`: writes the Grafana dashboards in ops/grafana/ from the panels below.

The JSON files are what an operator imports (Dashboards → New → Import → upload); this module is
how they are kept consistent: one data-source variable (`datasource`, any Prometheus), the same
time range, refresh and layout everywhere, and every query written once here. A test checks that
the committed files are exactly what this module writes, and that every panel's query returns a
series from a real Prometheus scraping a running mesh.

Queries use only the metrics the processes export (jobs are `ctrlmesh-<process>`, see
ops/prometheus.py); `$__rate_interval` is Grafana's own. The one exception is named in PENDING.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
# Metrics a panel shows that no process exports yet, with who will: their panels read "No data"
# until then (the autoscaler's L1 ⇄ L2 handoffs).
PENDING = {"ctrlmesh_handoffs_total": "the databases service's autoscaler (handoffs)"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # or "stat"
    width: int = 12


@dataclass(frozen=True)
class Variable:
    """A query variable over a label, with All (regex `.*`) selected by default."""

    name: str
    label: str
    query: str  # label_values(...)


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel]
    variables: list[Variable] = field(default_factory=list)


def q(expr: str, legend: str = "") -> Query:
    return Query(" ".join(expr.split()), legend)


def quantiles(metric: str, by: str, legend: str, where: str = "") -> tuple[Query, ...]:
    """p50 and p99 of a histogram, per `by`."""
    sel = f"{metric}_bucket{{{where}}}" if where else f"{metric}_bucket"
    return tuple(
        q(
            f"histogram_quantile({p}, sum by ({by + ', ' if by else ''}le) (rate({sel}[{RATE}])))",
            f"p{int(p * 100)} {legend}".strip(),
        )
        for p in (0.5, 0.99)
    )


def ratio(metric: str, bad: str, by: str, where: str = "") -> str:
    """The share of `metric` matching `bad`, per `by`: 0 (not absent) when nothing is bad."""
    base = f"{where}," if where else ""
    total = f"sum by ({by}) (rate({metric}{{{where}}}[{RATE}]))"
    errors = f"sum by ({by}) (rate({metric}{{{base}{bad}}}[{RATE}]))"
    return f"({errors} or 0 * {total}) / {total}"


HTTP = "ctrlmesh_http_requests_total"
GRPC = "ctrlmesh_grpc_server_requests_total"

OVERVIEW = Dashboard(
    "ctrlmesh-overview",
    "ctrlmesh / Overview",
    "Every process of the mesh and the headline figures of each part.",
    [
        Panel(
            "Processes up",
            (q('up{job=~"ctrlmesh-.*"}', "{{job}} {{worker}}"),),
            "short",
            "1 when Prometheus scraped the process's /metrics (alert: CtrlmeshProcessDown).",
            kind="stat",
            width=24,
        ),
        Panel("Edge requests/s", (q(f"sum(rate({HTTP}[{RATE}]))", "requests/s"),), "reqps"),
        Panel(
            "Edge 5xx ratio",
            (
                q(
                    f'(sum(rate({HTTP}{{status=~"5.."}}[{RATE}])) or vector(0)) / sum(rate({HTTP}[{RATE}]))',
                    "5xx",
                ),
            ),
            "percentunit",
        ),
        Panel(
            "gRPC requests/s by service",
            (q(f"sum by (service) (rate({GRPC}[{RATE}]))", "{{service}}"),),
            "reqps",
        ),
        Panel(
            "PG Gateway connections",
            (
                q("sum(pggateway_client_connections)", "clients"),
                q("sum(pggateway_server_connections)", "backends"),
            ),
        ),
        Panel("Instances by state", (q("sum by (state) (ctrlmesh_instances)", "{{state}}"),)),
        Panel(
            "Reconcile lag (oldest unsettled resource)",
            (q("max by (job, runner) (ctrlmesh_reconcile_lag_seconds)", "{{job}} {{runner}}"),),
            "s",
        ),
    ],
)

EDGE = Dashboard(
    "ctrlmesh-edge",
    "ctrlmesh / Edge (HTTP API)",
    "RED by route: rate, errors and duration of the HTTP/JSON edge, per route template.",
    [
        Panel(
            "Requests/s by route",
            (q(f'sum by (route) (rate({HTTP}{{route=~"$route"}}[{RATE}]))', "{{route}}"),),
            "reqps",
            width=24,
        ),
        Panel(
            "Errors/s by route and status (4xx, 5xx)",
            (
                q(
                    f'sum by (route, status) (rate({HTTP}{{route=~"$route",status=~"[45].."}}[{RATE}]))',
                    "{{status}} {{route}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "5xx ratio by route",
            (q(ratio(HTTP, 'status=~"5.."', "route", 'route=~"$route"'), "{{route}}"),),
            "percentunit",
            "Share of answers that were 5xx (alert: CtrlmeshEdge5xxRatio, over all routes).",
        ),
        Panel(
            "Latency p50 / p99 by route",
            quantiles("ctrlmesh_http_request_seconds", "route", "{{route}}", 'route=~"$route"'),
            "s",
        ),
        Panel(
            "Requests/s by status",
            (q(f'sum by (status) (rate({HTTP}{{route=~"$route"}}[{RATE}]))', "{{status}}"),),
            "reqps",
        ),
    ],
    [Variable("route", "Route", f'label_values({HTTP}{{job="ctrlmesh-edge"}}, route)')],
)

GRPC_DASH = Dashboard(
    "ctrlmesh-grpc",
    "ctrlmesh / gRPC services",
    "Every service's RPCs, per service and method: rate, non-OK codes and latency.",
    [
        Panel(
            "Requests/s by service and method",
            (
                q(
                    f'sum by (service, method) (rate({GRPC}{{service=~"$service"}}[{RATE}]))',
                    "{{service}}/{{method}}",
                ),
            ),
            "reqps",
            width=24,
        ),
        Panel(
            "Non-OK answers/s by method and code",
            (
                q(
                    f'sum by (service, method, code) (rate({GRPC}{{service=~"$service",code!="OK"}}[{RATE}]))',
                    "{{code}} {{service}}/{{method}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "Non-OK ratio by service",
            (q(ratio(GRPC, 'code!="OK"', "service", 'service=~"$service"'), "{{service}}"),),
            "percentunit",
        ),
        Panel(
            "Latency p50 / p99 by method",
            quantiles(
                "ctrlmesh_grpc_server_latency_seconds",
                "service, method",
                "{{service}}/{{method}}",
                'service=~"$service"',
            ),
            "s",
            width=24,
        ),
    ],
    [Variable("service", "Service", f"label_values({GRPC}, service)")],
)

PGGATEWAY = Dashboard(
    "ctrlmesh-pggateway",
    "ctrlmesh / PG Gateway and serverless databases",
    "Connections, pooled checkouts and their wait, cold starts, pins, handoffs, and the errors "
    "clients saw (per gateway worker where it matters).",
    [
        Panel(
            "Client connections by worker",
            (q("sum by (worker) (pggateway_client_connections)", "worker {{worker}}"),),
        ),
        Panel(
            "Backend connections by worker",
            (q("sum by (worker) (pggateway_server_connections)", "worker {{worker}}"),),
        ),
        Panel(
            "Connections opened/s",
            (
                q(f"sum(rate(pggateway_client_connections_accepted_total[{RATE}]))", "clients accepted"),
                q(f"sum(rate(pggateway_server_connections_opened_total[{RATE}]))", "backends opened"),
            ),
            "ops",
        ),
        Panel(
            "Checkouts/s (pooled transactions)",
            (q(f"sum by (worker) (rate(pggateway_checkouts_total[{RATE}]))", "worker {{worker}}"),),
            "ops",
        ),
        Panel("Checkout wait p50 / p99", quantiles("pggateway_checkout_wait_seconds", "", ""), "s"),
        Panel(
            "Checkout timeouts/s (53300)",
            (q(f"sum(rate(pggateway_checkout_timeouts_total[{RATE}]))", "timeouts"),),
            "ops",
            "Alert: PgGatewayCheckoutTimeouts.",
        ),
        Panel(
            "Cold starts/s",
            (
                q(f"sum(rate(pggateway_cold_starts_total[{RATE}]))", "clients held for a boot"),
                q(
                    f"sum by (outcome) (rate(ctrlmesh_databases_cold_starts_total[{RATE}]))",
                    "writers started: {{outcome}}",
                ),
            ),
            "ops",
        ),
        Panel(
            "Cold start time p50 / p99",
            (
                *quantiles("pggateway_wake_seconds", "", "client held"),
                *quantiles("ctrlmesh_databases_boot_seconds", "", "booting → ready"),
            ),
            "s",
            "The client's wait for its database to boot, and the databases service's boot (alert: "
            "PgGatewayColdStartSlow).",
        ),
        Panel(
            "Pinned sessions and pins/s by reason",
            (
                q("sum(pggateway_pinned_sessions)", "pinned now"),
                q(f"sum by (reason) (rate(pggateway_pins_total[{RATE}]))", "pins/s: {{reason}}"),
            ),
        ),
        Panel(
            "Handoffs/s by result",
            (q(f"sum by (result) (rate(ctrlmesh_handoffs_total[{RATE}]))", "{{result}}"),),
            "ops",
            "L1 ⇄ L2 writer handoffs (alert: CtrlmeshHandoffFailed). The metric comes with the autoscaler.",
        ),
        Panel("Leases held", (q("sum by (worker) (pggateway_leases)", "worker {{worker}}"),)),
        Panel(
            "Refused logins and client-visible errors/s",
            (
                q(
                    f"sum by (reason) (rate(pggateway_auth_failures_total[{RATE}]))",
                    "login refused: {{reason}}",
                ),
                q(f"sum by (kind) (rate(pggateway_connection_errors_total[{RATE}]))", "error: {{kind}}"),
            ),
            "ops",
        ),
        Panel(
            "Backends and computes lost, idle stops",
            (
                q(f"sum(rate(pggateway_backends_lost_total[{RATE}]))", "backends lost"),
                q(f"sum(rate(pggateway_compute_lost_total[{RATE}]))", "computes found gone"),
                q(f"sum(rate(ctrlmesh_databases_computes_lost_total[{RATE}]))", "writers died"),
                q(f"sum(rate(ctrlmesh_databases_idle_stops_total[{RATE}]))", "idle stops"),
            ),
            "ops",
            width=24,
        ),
    ],
)

RECONCILE = Dashboard(
    "ctrlmesh-reconcile",
    "ctrlmesh / Reconcile",
    "The reconcile drives (databases, instances) and the periodic loops of every service: lag, "
    "throughput, failures.",
    [
        Panel(
            "Reconcile lag by runner",
            (q("max by (job, runner) (ctrlmesh_reconcile_lag_seconds)", "{{job}} {{runner}}"),),
            "s",
            "How long the oldest resource kicked and not yet settled has waited (alert: CtrlmeshReconcileLag).",
        ),
        Panel(
            "Drives settled/s",
            (
                q(
                    f"sum by (job, runner) (rate(ctrlmesh_reconcile_drives_total[{RATE}]))",
                    "{{job}} {{runner}}",
                ),
            ),
            "ops",
        ),
        Panel(
            "Drive time p50 / p99",
            quantiles("ctrlmesh_reconcile_drive_seconds", "job, runner", "{{job}} {{runner}}"),
            "s",
        ),
        Panel(
            "Step failures and lost claims/s",
            (
                q(
                    f"sum by (job, runner) (rate(ctrlmesh_reconcile_step_failures_total[{RATE}]))",
                    "failed: {{job}} {{runner}}",
                ),
                q(
                    f"sum by (job, runner) (rate(ctrlmesh_reconcile_claims_lost_total[{RATE}]))",
                    "claim lost: {{job}} {{runner}}",
                ),
            ),
            "ops",
            "Alert: CtrlmeshReconcileFailing.",
        ),
        Panel(
            "Periodic passes/s",
            (q(f"sum by (job, loop) (rate(ctrlmesh_periodic_passes_total[{RATE}]))", "{{job}} {{loop}}"),),
            "ops",
        ),
        Panel(
            "Periodic failures/s",
            (q(f"sum by (job, loop) (rate(ctrlmesh_periodic_failures_total[{RATE}]))", "{{job}} {{loop}}"),),
            "ops",
            "Alert: CtrlmeshPeriodicLoopFailing.",
        ),
        Panel(
            "Seconds since each loop's last good pass",
            (
                q(
                    "time() - max by (job, loop) (ctrlmesh_periodic_last_success_timestamp_seconds)",
                    "{{job}} {{loop}}",
                ),
            ),
            "s",
            width=24,
        ),
    ],
)

INSTANCES = Dashboard(
    "ctrlmesh-instances",
    "ctrlmesh / Instances and health",
    "App instances by state and engine, the engines' reachability, health-check outcomes, and "
    "the instances service's reconcile and API.",
    [
        Panel("Instances by state", (q("sum by (state) (ctrlmesh_instances)", "{{state}}"),)),
        Panel(
            "Live instances by provider",
            (q('sum by (provider) (ctrlmesh_instances{state!~"stopped|failed"})', "{{provider}}"),),
        ),
        Panel(
            "Engines up",
            (q("ctrlmesh_instance_provider_up", "{{provider}}"),),
            "short",
            "1 when the engine answered its last probe (alert: CtrlmeshInstanceProviderDown).",
            kind="stat",
        ),
        Panel(
            "Health checks/s by outcome",
            (q(f"sum by (status) (rate(ctrlmesh_instance_health_checks_total[{RATE}]))", "{{status}}"),),
            "ops",
        ),
        Panel(
            "Unhealthy check ratio",
            (q(ratio("ctrlmesh_instance_health_checks_total", 'status="unhealthy"', "job"), "unhealthy"),),
            "percentunit",
        ),
        Panel(
            "Instance reconcile lag and drives",
            (
                q('max(ctrlmesh_reconcile_lag_seconds{job="ctrlmesh-instances"})', "lag (s)"),
                q(
                    f'sum(rate(ctrlmesh_reconcile_drives_total{{job="ctrlmesh-instances"}}[{RATE}]))',
                    "drives/s",
                ),
            ),
        ),
        Panel(
            "Instances API: requests/s by method",
            (q(f'sum by (method) (rate({GRPC}{{job="ctrlmesh-instances"}}[{RATE}]))', "{{method}}"),),
            "reqps",
            width=24,
        ),
    ],
)

DASHBOARDS = (OVERVIEW, EDGE, GRPC_DASH, PGGATEWAY, RECONCILE, INSTANCES)


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend}
            for i, t in enumerate(p.queries)
        ],
    }
    if p.kind == "timeseries":
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        }
    else:
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"]},
            "colorMode": "background",
            "textMode": "value_and_name",
        }
        out["fieldConfig"]["defaults"]["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
        }
    return out


def _variable(v: Variable) -> dict[str, Any]:
    return {
        "name": v.name,
        "label": v.label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": v.query, "refId": "var"},
        "definition": v.query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def render(d: Dashboard) -> dict[str, Any]:
    panels, x, y = [], 0, 0
    for i, p in enumerate(d.panels, start=1):
        if x + p.width > 24:
            x, y = 0, y + 8
        panels.append(_panel(p, i, x, y))
        x += p.width
    datasource_var = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
    }
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": ["ctrlmesh"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "graphTooltip": 1,
        "links": [{"type": "dashboards", "tags": ["ctrlmesh"], "asDropdown": True, "title": "ctrlmesh"}],
        "templating": {"list": [datasource_var, *(_variable(v) for v in d.variables)]},
        "annotations": {"list": []},
        "panels": panels,
    }


def files() -> dict[Path, str]:
    """Every dashboard file and its content."""
    return {
        OUT / f"{d.uid}.json": json.dumps(render(d), indent=2, ensure_ascii=False) + "\n" for d in DASHBOARDS
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for path, text in files().items():
        path.write_text(text)


if __name__ == "__main__":
    main()
