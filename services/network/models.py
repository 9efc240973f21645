"""The network schema: domains and secrets (routes and certificates come with their logic)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

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
