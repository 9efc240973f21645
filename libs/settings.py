"""Typed settings from `CTRLMESH_*` environment variables: the one place configuration is read.

Every process calls `Settings.load()` once at start and passes the result down; nothing reads
the environment anywhere else. The README's configuration table mirrors the fields below.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> timedelta:
    """Accept `4s`, `2m`, `1.5h`, `250ms`, a bare number of seconds, or a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 2m, 1h)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

SERVICES = ("accounts", "databases", "instances", "network", "clusters")


class Settings(BaseSettings):
    """ctrlmesh configuration. Defaults work on one machine with nothing set."""

    model_config = SettingsConfigDict(env_prefix="CTRLMESH_", extra="ignore")

    data_dir: Path = Path(".ctrlmesh")
    database_url: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    pg_port: int = 6432
    pg_host: str = "127.0.0.1"
    # The host name clients use for the PG Gateway (in dsn_template).
    public_pg_host: str = "localhost"
    # The PG Gateway (pggateway/). TLS: a CA and a server certificate are generated into
    # <data_dir>/pggateway/ at first start unless both files are given.
    pg_tls_cert: Path | None = None
    pg_tls_key: Path | None = None
    # How long a client is held while its database boots before 57P03 "the database is starting".
    pg_wake_timeout: Duration = timedelta(seconds=30)
    # Backend connections per database (split between the gateway workers), and how long a
    # client waits for one before 53300.
    pg_pool_size: int = 20
    pg_checkout_timeout: Duration = timedelta(seconds=30)
    # The gateway's lease on a database (renewed every third of it while clients are connected).
    pg_lease_ttl: Duration = timedelta(seconds=30)
    # How long looked-up tenant credentials are reused: short, so a rotation applies quickly.
    pg_credentials_cache_ttl: Duration = timedelta(seconds=2)
    # Named prepared statements the PG Gateway keeps per backend, so drivers that prepare
    # (asyncpg, psycopg) keep transaction pooling; 0 turns it off (a named statement pins).
    pg_max_prepared_statements: int = Field(default=200, ge=0)
    # Prometheus /metrics of the gateway; pg_port + 1000 when unset. Worker i of the gateway
    # serves its own figures on this port + i.
    pg_metrics_port: int | None = None
    # Gateway worker processes sharing pg_port (SO_REUSEPORT); the number of CPUs when unset.
    pg_workers: int | None = None
    # The directory where the PG Gateway also listens on a Unix socket (`.s.PGSQL.<pg_port>`, as
    # libpq names it): no TLS there, SCRAM as over TCP, the file's permissions are the boundary.
    # Bound apps on a local Docker engine get it mounted at /run/ctrlmesh/pg. Default
    # <data_dir>/pg-socket; "off" turns the socket off.
    pg_socket_dir: str = ""
    grpc_host: str = "127.0.0.1"
    accounts_port: int = 50051
    databases_port: int = 50052
    instances_port: int = 50053
    network_port: int = 50054
    clusters_port: int = 50055
    # Each service process also serves Prometheus /metrics on its gRPC port + this offset.
    metrics_port_offset: int = 1000
    embedded_pg_port: int = 55432
    bootstrap_admin_key: str | None = None
    admin_email: str = "admin@localhost"
    idle_timeout: Duration = timedelta(seconds=300)
    # How the databases service runs writers: `local` (one PostgreSQL process per database here).
    compute_driver: str = "local"
    # The writer autoscaler (services/databases/autoscaler.py): how often it looks at each ready
    # database, the window its load is averaged over (scale-down needs twice that of low load),
    # the pause after a handoff (or a failed one) before the next, and the thresholds: the
    # writer's CPU use as a fraction of its profile's quota, and checkouts gateways had to queue
    # per second. autoscale_max_profile bounds the live contract (L1 ⇄ L2; up to L5 if set).
    autoscale_enabled: bool = True
    autoscale_interval: Duration = timedelta(seconds=5)
    autoscale_window: Duration = timedelta(seconds=60)
    autoscale_cooldown: Duration = timedelta(seconds=300)
    autoscale_cpu_up: float = Field(default=0.75, gt=0, le=1)
    autoscale_cpu_down: float = Field(default=0.25, ge=0, lt=1)
    autoscale_waits_up: float = Field(default=5.0, gt=0)
    autoscale_max_profile: str = Field(default="L2", pattern=r"^L[1-5]$")
    # The deadlines of a handoff's phases: gateways acknowledging the freeze, in-flight and
    # pinned sessions draining, the new writer starting (then the old profile is started again).
    handoff_freeze_timeout: Duration = timedelta(seconds=5)
    handoff_drain_timeout: Duration = timedelta(seconds=10)
    handoff_start_timeout: Duration = timedelta(seconds=30)
    # Extra PostgreSQL settings per profile, JSON: {"L2": {"work_mem": "8MB"}} (operators'
    # overrides of the profile table; the tests inject a bad one to make a candidate fail).
    profile_settings: str = ""
    auth_cache_ttl: Duration = timedelta(seconds=5)
    # How long a service's hot reads reuse what accounts said about a tenant (status, account,
    # name) without asking again (writes always ask); accounts' events invalidate it at once
    # (libs/peers.py TenantCache), so this bounds staleness only while that stream stalls. 0: off.
    tenant_cache_ttl: Duration = timedelta(seconds=5)
    # The edge: the largest request body it reads (413 beyond), and the deadline of a call that
    # sends no `Grpc-Timeout` (GET reads, other methods writes), so a frozen service costs seconds.
    max_body_bytes: int = 1024 * 1024
    read_deadline: Duration = timedelta(seconds=5)
    write_deadline: Duration = timedelta(seconds=15)
    # How long `/health` waits for each service's answer before naming it failing.
    health_timeout: Duration = timedelta(seconds=1)
    # Signs the principal the edge hands to services; generated into the data dir when unset.
    internal_secret: str | None = None
    # Key-encryption key (base64, 32 bytes) for secrets stored encrypted; generated when unset.
    kek: str | None = None
    kek_id: str = "k1"
    # Retired KEKs still needed to decrypt (`id:base64[,id:base64...]`) while stored values are
    # re-wrapped to the current one; drop one once nothing names it any more.
    kek_previous: str = ""
    # How often the network service re-wraps secret versions still under a retired KEK.
    secrets_rewrap_interval: Duration = timedelta(seconds=60)
    # Where the docker provider writes an instance's file secrets, bind-mounted read-only at
    # /run/secrets: it must be a tmpfs (memory, never the disk) on the engine's host.
    secrets_runtime_dir: Path = Path("/dev/shm/ctrlmesh-secrets")
    log_level: str = "INFO"
    # The share of traces recorded when spans are exported (OTEL_EXPORTER_OTLP_ENDPOINT set): the
    # edge (or a background loop) decides for each new trace; every process downstream follows
    # that decision (parent-based). Without an exporter nothing is recorded, whatever this says.
    trace_sample_ratio: float = Field(default=1.0, ge=0, le=1)
    # The event loop of the services and the edge: uvloop (its transports write and read with
    # less Python per call) or the standard library's, kept for comparison and as a fallback.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # Instances: the provider registry keys to register (each only once its engine answers) and
    # the default for creates that name none (the first registered when empty).
    providers: str = "docker"
    default_provider: str = ""
    # The Docker engine of the docker and swarm providers; DOCKER_HOST is honoured as well.
    docker_host: str | None = Field(
        default=None, validation_alias=AliasChoices("CTRLMESH_DOCKER_HOST", "DOCKER_HOST")
    )
    # Pull an image the engine lacks (off for air-gapped engines and the test suite).
    docker_pull: bool = True
    # Grace a container gets on stop before it is killed.
    instance_stop_timeout: Duration = timedelta(seconds=5)
    # How long a new replica may take to pass the health gate of a deployment.
    deploy_health_timeout: Duration = timedelta(seconds=120)
    # Without health checks, a new replica passes the gate after running this long.
    deploy_settle: Duration = timedelta(seconds=2)
    # Before a rollout stops old replicas, they leave the ingress's upstreams and get this long to
    # finish what they are serving (the ingress re-reads a deploying instance every 150 ms).
    deploy_drain: Duration = timedelta(seconds=1)
    provider_probe_interval: Duration = timedelta(seconds=10)
    # The ingress (network service): a Caddy configured only through its admin API. The launcher
    # starts one (Debian's `caddy`) with its admin endpoint on 127.0.0.1:ingress_admin_port,
    # unless ingress_admin_url names an external Caddy to configure instead. Every instance
    # answers at http://<instance>.<tenant>.<ingress_domain>:<ingress_http_port>.
    ingress_admin_port: int = 2019
    ingress_admin_url: str | None = None
    ingress_http_port: int = 8880
    ingress_https_port: int = 8443
    # The address Caddy's HTTP and HTTPS servers bind (loopback on one machine).
    ingress_bind: str = "127.0.0.1"
    ingress_domain: str = "localhost"
    # How often the ingress compares Caddy's config with the rendered one (a restarted Caddy is
    # refilled within this), and how often every instance's replicas are looked up again.
    ingress_reconcile_interval: Duration = timedelta(seconds=1)
    ingress_resync_interval: Duration = timedelta(seconds=10)
    # The OTLP receiver of app instances (in the instances service): gRPC and HTTP (protobuf and
    # JSON) on otlp_host. Containers reach it only if otlp_host is an address they can route to
    # (e.g. the docker bridge's 172.17.0.1) and otlp_endpoint names it; the default suits apps
    # on this host and the tests.
    otlp_host: str = "127.0.0.1"
    otlp_grpc_port: int = 4317
    otlp_http_port: int = 4318
    # What every rollout hands an instance as OTEL_EXPORTER_OTLP_ENDPOINT (OTLP/HTTP protobuf);
    # http://<otlp_host>:<otlp_http_port> when unset.
    otlp_endpoint: str | None = None
    # The largest export accepted (after decompression); larger ones are refused, not read.
    otlp_max_body_bytes: int = 4 * 1024 * 1024
    # Exports per second per instance (a token bucket of otlp_rate_burst); beyond it the sender
    # gets RESOURCE_EXHAUSTED / 429 with the delay to retry after.
    otlp_rate_limit: float = 20.0
    otlp_rate_burst: int = 40
    # Spans, metric points and resource samples older than this are dropped, a day partition
    # at a time.
    telemetry_retention: Duration = timedelta(days=7)
    # How often the engine's resource usage of every running instance is sampled for /resources.
    resource_sample_interval: Duration = timedelta(seconds=30)
    # How long the launcher waits for every process to serve before it gives up (a loaded machine
    # needs more than an idle one: Python processes import slowly when CPUs are shared).
    start_timeout: Duration = timedelta(seconds=120)
    # The launcher restarts a process that dies: after restart_backoff, doubling per restart up
    # to restart_backoff_max; a process that needs more than restart_limit restarts within
    # restart_window is left stopped (logged as failed) while the rest keeps serving.
    restart_backoff: Duration = timedelta(seconds=0.5)
    restart_backoff_max: Duration = timedelta(seconds=10)
    restart_limit: int = 5
    restart_window: Duration = timedelta(seconds=60)
    # Domains (network): the host a custom domain's CNAME must point at (the ingress domain when
    # empty); the DNS server verification asks (`host[:port]`; the system's resolvers when
    # empty); the first delay of the background re-check of an unverified domain, doubling up
    # to the max.
    dns_target: str = ""
    dns_resolver: str = ""
    domain_recheck: Duration = timedelta(seconds=30)
    domain_recheck_max: Duration = timedelta(hours=1)
    # Certificates (network): the ACME directory (Let's Encrypt's production one by default),
    # the account's contact, a CA bundle to trust a private ACME server's TLS (Pebble's), how
    # long before expiry a certificate is renewed, how often the worker looks for due work
    # (renewals and retries), the first retry delay after a failed attempt (doubling), and the
    # deadline of one ACME order.
    acme_directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    acme_email: str = ""
    acme_ca_bundle: Path | None = None
    cert_renew_before: Duration = timedelta(days=30)
    cert_renew_interval: Duration = timedelta(seconds=60)
    acme_retry: Duration = timedelta(seconds=30)
    acme_timeout: Duration = timedelta(seconds=90)
    # `make observe`: the Prometheus it starts (on loopback, data under <data_dir>/prometheus)
    # and how often it scrapes every process's /metrics.
    prometheus_port: int = 9090
    prometheus_scrape_interval: Duration = timedelta(seconds=15)
    # Clusters: how often each cluster's engine is asked for its nodes (their heartbeat); a node
    # whose engine has not answered for node_not_ready_after is `not_ready`, after node_down_after
    # `down`.
    node_poll_interval: Duration = timedelta(seconds=2)
    node_not_ready_after: Duration = timedelta(seconds=10)
    node_down_after: Duration = timedelta(seconds=30)
    version: str = Field(default="0.1.0")

    @classmethod
    def load(cls) -> Settings:
        return cls()

    def service_port(self, name: str) -> int:
        return int(getattr(self, f"{name}_port"))

    def service_target(self, name: str) -> str:
        return f"{self.grpc_host}:{self.service_port(name)}"

    def ingress_admin(self) -> str:
        """The base URL of the Caddy admin API the network service configures."""
        return (self.ingress_admin_url or f"http://127.0.0.1:{self.ingress_admin_port}").rstrip("/")

    def pg_socket_path(self) -> Path | None:
        """The PG Gateway's socket directory, None when it is turned off."""
        if self.pg_socket_dir.strip().lower() == "off":
            return None
        where = Path(self.pg_socket_dir) if self.pg_socket_dir.strip() else self.data_dir / "pg-socket"
        # Absolute: a container's bind mount names it, and the engine knows no working directory.
        return where.absolute()

    def secret_file(self, name: str) -> Path:
        return self.data_dir / "secrets" / name
