"""The tables of certificates and ACME state (the `domains` table itself is in
services/network/models.py). Keys and certificates are envelope-encrypted with libs.crypto."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, ForeignKey, Integer, String, Table, Text

from services.network.models import SCHEMA, TS, metadata

certificates = Table(
    "certificates",
    metadata,
    Column("id", String(64), primary_key=True),
    # One current certificate per domain: a renewal replaces its material in place.
    Column(
        "domain_id",
        String(64),
        ForeignKey(f"{SCHEMA}.domains.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("account_id", String(64), nullable=False, server_default=""),
    Column("hostname", String(253), nullable=False),
    # pending | issued | failed
    Column("state", String(16), nullable=False),
    Column("issuer", Text, nullable=False, server_default=""),
    Column("serial", String(128), nullable=False, server_default=""),
    Column("not_before", TS),
    Column("expires_at", TS),
    Column("auto_renew", Boolean, nullable=False, server_default="true"),
    Column("last_error", Text, nullable=False, server_default=""),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", TS),
    # The chain (leaf first) and the private key, each envelope-encrypted (aad: the cert id).
    Column("chain_enc", Text),
    Column("key_enc", Text),
    Column("renewed_at", TS),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

acme_accounts = Table(
    "acme_accounts",
    metadata,
    # One account per ACME directory.
    Column("directory", String(512), primary_key=True),
    Column("key_enc", Text, nullable=False),
    Column("uri", Text, nullable=False, server_default=""),
    Column("created_at", TS, nullable=False),
)

acme_challenges = Table(
    "acme_challenges",
    metadata,
    # HTTP-01 answers the ingress serves while an order is being validated.
    Column("token", String(256), primary_key=True),
    Column("key_authorization", Text, nullable=False),
    Column("hostname", String(253), nullable=False),
    Column("expires_at", TS, nullable=False),
)
