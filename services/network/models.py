"""The network schema: domains and secrets (certificates and ACME state: services/network/domains/models.py)."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, DateTime, Integer, MetaData, String, Table, Text, UniqueConstraint

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
    Column("version", Integer, nullable=False),
    # Envelope-encrypted with libs.crypto; never returned by the API.
    Column("value_enc", Text, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("tenant_id", "instance_id", "key", name="uq_secrets_key"),
)

outbox = outbox_table(metadata)
