"""Telemetry that app instances send: an OTLP receiver (gRPC and HTTP), its PostgreSQL store,
the queries behind /metrics, /traces, /resources and the dashboard, and the environment every
rollout hands an instance so the OpenTelemetry SDK in it exports here with its own token.

`Telemetry` is built once by the instances service; its loops (the receiver, retention, the
resource sampler) run as the service's background tasks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from sqlalchemy import Column, MetaData, String, Table

from libs.db import Database
from libs.reconcile import every
from libs.settings import Settings
from services.instances.otlp.decode import INSTANCE_ATTR, RELEASE_ATTR, TENANT_ATTR
from services.instances.otlp.ingest import Ingest, RateLimiter
from services.instances.otlp.queries import Queries
from services.instances.otlp.receiver import TOKEN_HEADER, Receiver
from services.instances.otlp.store import PARTITIONED, SCHEMA, Store
from services.instances.otlp.tokens import Tokens

__all__ = ["Telemetry"]


class Owned(Protocol):
    """The instance a rollout is for (services.instances.repository.Instance)."""

    @property
    def id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...
    @property
    def slug(self) -> str: ...


# Sampled usage of every running instance: (tenant_id, instance_id, time, cpu, mem, limit, in, out).
Sampler = Callable[[], Awaitable[list[tuple[Any, ...]]]]


class Telemetry:
    def __init__(self, db: Database, settings: Settings, *, sampler: Sampler | None = None):
        self.settings = settings
        self.store = Store(db, retention=settings.telemetry_retention)
        self.tokens = Tokens(db)
        self.queries = Queries(db)
        self.ingest = Ingest(
            self.store,
            self.tokens,
            RateLimiter(settings.otlp_rate_limit, settings.otlp_rate_burst),
            retention=settings.telemetry_retention,
        )
        self.receiver = Receiver(
            self.ingest,
            host=settings.otlp_host,
            grpc_port=settings.otlp_grpc_port,
            http_port=settings.otlp_http_port,
            max_bytes=settings.otlp_max_body_bytes,
        )
        self.sampler = sampler

    @property
    def tables(self) -> list[Table]:
        """The telemetry tables, for the tenant purge (rows keyed by tenant_id)."""
        md = MetaData(schema=SCHEMA)
        return [
            Table(name, md, Column("tenant_id", String), Column("instance_id", String))
            for name in (*PARTITIONED, "telemetry_tokens")
        ]

    @property
    def endpoint(self) -> str:
        return (
            self.settings.otlp_endpoint or f"http://{self.settings.otlp_host}:{self.settings.otlp_http_port}"
        )

    async def rollout_env(
        self, instance: Owned, release_id: str, services: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """`services` with the OTEL_* variables of this rollout in each one's env, and a fresh
        ingest token issued for them (the previous rollout's stays valid until the next). A
        variable the service's own env sets wins, except our keys inside OTEL_RESOURCE_ATTRIBUTES."""
        token = await self.tokens.issue(instance.id, instance.tenant_id, release_id)
        out = []
        for svc in services:
            own = dict(svc.get("env") or {})
            ours = {
                INSTANCE_ATTR: instance.id,
                TENANT_ATTR: instance.tenant_id,
                RELEASE_ATTR: release_id,
                "service.version": release_id,
            }
            attrs = dict(
                kv.split("=", 1) for kv in own.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",") if "=" in kv
            )
            attrs.update(ours)
            env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_HEADERS": f"{TOKEN_HEADER}={token}",
                "OTEL_SERVICE_NAME": instance.slug or instance.id,
                **own,
                "OTEL_RESOURCE_ATTRIBUTES": ",".join(f"{k}={v}" for k, v in attrs.items()),
            }
            out.append({**svc, "env": env})
        return out

    async def sample_resources(self) -> None:
        if self.sampler is not None:
            await self.store.write_resources(await self.sampler())

    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        retention = min(3600.0, max(1.0, self.settings.telemetry_retention.total_seconds() / 24))

        async def retain() -> None:
            await every("telemetry-retention", retention, self.store.drop_expired, first=5)

        async def sample() -> None:
            await every(
                "telemetry-resources",
                self.settings.resource_sample_interval.total_seconds(),
                self.sample_resources,
            )

        return [self.receiver.run, retain, sample]
