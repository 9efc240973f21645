"""instances: instances, outbox (frozen: later changes are migrations of their own)

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from libs.outbox import create_outbox_table

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "instances"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("slug", sa.String(128), nullable=False),
        sa.Column("provider_name", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("image", sa.Text, nullable=False, server_default=""),
        sa.Column("cpu_millis", sa.Integer, nullable=False, server_default="0"),
        sa.Column("memory_mb", sa.Integer, nullable=False, server_default="0"),
        sa.Column("disk_mb", sa.Integer, nullable=False, server_default="0"),
        sa.Column("replicas", sa.Integer, nullable=False, server_default="1"),
        sa.Column("spec", JSONB, nullable=False, server_default="{}"),
        sa.Column("labels", JSONB, nullable=False, server_default="{}"),
        sa.Column("suspended_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )
    op.create_index("ix_instances_tenant_id", "instances", ["tenant_id"], schema=S)
    create_outbox_table(op, S)
