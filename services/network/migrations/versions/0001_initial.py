"""network: domains, secrets, outbox (frozen: later changes are migrations of their own)

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from libs.outbox import create_outbox_table

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "network"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("hostname", sa.String(253), nullable=False),
        sa.Column("verified", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("verify_token", sa.String(128), nullable=False),
        sa.Column("tls_enabled", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("hostname", name="uq_domains_hostname"),
        schema=S,
    )
    op.create_table(
        "secrets",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("value_enc", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("tenant_id", "instance_id", "key", name="uq_secrets_key"),
        schema=S,
    )
    create_outbox_table(op, S)
