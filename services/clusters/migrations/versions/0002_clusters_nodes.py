"""clusters: clusters, nodes and managed databases (frozen: later changes are migrations of
their own)

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "clusters"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "clusters",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("config", JSONB, nullable=False),
        sa.Column("endpoint", sa.String(2048), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "cluster_id", sa.String(36), sa.ForeignKey(f"{S}.clusters.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("engine_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("availability", sa.String(8), nullable=False, server_default="active"),
        sa.Column("engine_state", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cpu", sa.Float, nullable=False, server_default="0"),
        sa.Column("memory_mb", sa.Integer, nullable=False, server_default="0"),
        sa.Column("running_tasks", sa.Integer, nullable=False, server_default="0"),
        sa.Column("labels", JSONB, nullable=False),
        sa.Column("last_heartbeat_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("cluster_id", "engine_id", name="uq_nodes_engine"),
        schema=S,
    )
    op.create_table(
        "managed_databases",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("cluster_id", sa.String(36), sa.ForeignKey(f"{S}.clusters.id"), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("pg_name", sa.String(63), nullable=False),
        sa.Column("engine", sa.String(16), nullable=False),
        sa.Column("version", sa.String(16), nullable=False),
        sa.Column("db_id", sa.String(36), nullable=False),
        sa.Column("app_id", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False, server_default="active"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("tenant_id", "pg_name", name="uq_managed_databases_name"),
        schema=S,
    )
    op.create_index("ix_managed_databases_app", "managed_databases", ["app_id"], schema=S)
