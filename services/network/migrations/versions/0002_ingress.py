"""network: routes, and the ingress's copy of each instance it routes to

Revision ID: 0002_ingress
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002_ingress"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "network"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "routes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
        sa.Column("account_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("service_name", sa.String(63), nullable=False, server_default=""),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("strip_prefix", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("hostname", sa.String(253), nullable=False, server_default=""),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )
    op.create_index("ix_routes_instance", "routes", ["instance_id"], schema=S)
    op.create_table(
        "ingress_instances",
        sa.Column("instance_id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
        sa.Column("account_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("tenant_slug", sa.String(63), nullable=False),
        sa.Column("slug", sa.String(128), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("main_service", sa.String(63), nullable=False),
        sa.Column("ports", JSONB, nullable=False, server_default="[]"),
        sa.Column("upstreams", JSONB, nullable=False, server_default="[]"),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("ingress_instances", schema=S)
    op.drop_table("routes", schema=S)
