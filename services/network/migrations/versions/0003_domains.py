"""network: domain verification and re-check, certificates, ACME account and challenges

Revision ID: 0003_domains
Revises: 0002_ingress
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_domains"
down_revision = "0002_ingress"
branch_labels = None
depends_on = None

S = "network"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column(
        "domains", sa.Column("account_id", sa.String(64), nullable=False, server_default=""), schema=S
    )
    op.add_column("domains", sa.Column("verified_at", TS), schema=S)
    op.add_column("domains", sa.Column("next_check_at", TS), schema=S)
    op.add_column(
        "domains", sa.Column("check_attempts", sa.Integer, nullable=False, server_default="0"), schema=S
    )
    op.add_column(
        "domains", sa.Column("last_check_error", sa.Text, nullable=False, server_default=""), schema=S
    )
    op.add_column(
        "domains", sa.Column("auto_tls", sa.Boolean, nullable=False, server_default="false"), schema=S
    )
    op.add_column("domains", sa.Column("cert_expiry", TS), schema=S)
    op.create_index(
        "ix_domains_recheck", "domains", ["next_check_at"], schema=S, postgresql_where=sa.text("NOT verified")
    )
    op.create_table(
        "certificates",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "domain_id",
            sa.String(64),
            sa.ForeignKey(f"{S}.domains.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
        sa.Column("account_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("hostname", sa.String(253), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("issuer", sa.Text, nullable=False, server_default=""),
        sa.Column("serial", sa.String(128), nullable=False, server_default=""),
        sa.Column("not_before", TS),
        sa.Column("expires_at", TS),
        sa.Column("auto_renew", sa.Boolean, nullable=False, server_default="true"),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS),
        sa.Column("chain_enc", sa.Text),
        sa.Column("key_enc", sa.Text),
        sa.Column("renewed_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )
    op.create_table(
        "acme_accounts",
        sa.Column("directory", sa.String(512), primary_key=True),
        sa.Column("key_enc", sa.Text, nullable=False),
        sa.Column("uri", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", TS, nullable=False),
        schema=S,
    )
    op.create_table(
        "acme_challenges",
        sa.Column("token", sa.String(256), primary_key=True),
        sa.Column("key_authorization", sa.Text, nullable=False),
        sa.Column("hostname", sa.String(253), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("acme_challenges", schema=S)
    op.drop_table("acme_accounts", schema=S)
    op.drop_table("certificates", schema=S)
    op.drop_index("ix_domains_recheck", "domains", schema=S)
    for col in (
        "cert_expiry",
        "auto_tls",
        "last_check_error",
        "check_attempts",
        "next_check_at",
        "verified_at",
        "account_id",
    ):
        op.drop_column("domains", col, schema=S)
