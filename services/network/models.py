"""The network schema: domains, secrets, routes and what the ingress knows of each instance
(certificates and ACME state: services/network/domains/models.py)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

from libs.outbox import outbox_table

SCHEMA = "network"
metadata = MetaData(schema=SCHEMA)
TS = DateTime(timezone=True)

domains = Table(
    "domains",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("instance_id", String(64), nullable=False),
    Column("hostname", String(253), nullable=False),
    Column("verified", Boolean, nullable=False, server_default="false"),
    Column("verify_token", String(128), nullable=False),
    Column("tls_enabled", Boolean, nullable=False, server_default="false"),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    # 0003_domains: verification, its background re-check, and the certificate's summary.
    Column("account_id", String(64), nullable=False, server_default=""),
    Column("verified_at", TS),
    Column("next_check_at", TS),
    Column("check_attempts", Integer, nullable=False, server_default="0"),
    Column("last_check_error", Text, nullable=False, server_default=""),
    Column("auto_tls", Boolean, nullable=False, server_default="false"),
    Column("cert_expiry", TS),
    UniqueConstraint("hostname", name="uq_domains_hostname"),
)

secrets = Table(
    "secrets",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("instance_id", String(64), nullable=False),
    Column("key", String(256), nullable=False),
    Column("type", String(16), nullable=False),
    # The current version; every version's value is a row of secret_versions.
    Column("version", Integer, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("tenant_id", "instance_id", "key", name="uq_secrets_key"),
)

routes = Table(
    "routes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("account_id", String(64), nullable=False, server_default=""),
    Column("instance_id", String(64), nullable=False),
    Column("service_name", String(63), nullable=False, server_default=""),
    Column("path", String(1024), nullable=False),
    Column("port", Integer, nullable=False),
    Column("protocol", String(16), nullable=False),
    Column("weight", Integer, nullable=False),
    Column("strip_prefix", Boolean, nullable=False, server_default="false"),
    # Empty: the instance's own hostnames.
    Column("hostname", String(253), nullable=False, server_default=""),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Index("ix_routes_instance", "instance_id"),
)

# The ingress's copy of what it routes to, kept by following the instances service: the
# reconcile loop renders Caddy's config from this table and `routes` alone.
ingress_instances = Table(
    "ingress_instances",
    metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("account_id", String(64), nullable=False, server_default=""),
    Column("tenant_slug", String(63), nullable=False),
    Column("slug", String(128), nullable=False),
    Column("state", String(32), nullable=False),
    # The main service's name and its ports: [{"container_port", "protocol"}].
    Column("main_service", String(63), nullable=False),
    Column("ports", JSONB, nullable=False, server_default="[]"),
    # Every published port of every running replica: [{"service", "container_port", "host_port"}].
    Column("upstreams", JSONB, nullable=False, server_default="[]"),
    Column("updated_at", TS, nullable=False),
)

secret_versions = Table(
    "secret_versions",
    metadata,
    Column("secret_id", String(64), ForeignKey("secrets.id", ondelete="CASCADE"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    # Envelope-encrypted with libs.crypto (AAD: secret id and version); never returned by the API.
    Column("value_enc", Text, nullable=False),
    # The KEK the value's data key is wrapped with: what the re-wrap pass looks for.
    Column("kek_id", String(64), nullable=False, index=True),
    Column("created_at", TS, nullable=False),
)

outbox = outbox_table(metadata)
