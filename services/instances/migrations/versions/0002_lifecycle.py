"""instances: lifecycle columns, releases, deployments, health, providers, cursors

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

S = "instances"
TS = sa.DateTime(timezone=True)

# 0001 builds `instances` from the live model, so on a fresh database these columns already
# exist; IF NOT EXISTS makes this step right for both fresh and 0001-era databases.
_INSTANCE_COLUMNS = (
    "account_id varchar(64) NOT NULL DEFAULT ''",
    "desired_state varchar(16) NOT NULL DEFAULT 'running'",
    "generation integer NOT NULL DEFAULT 0",
    "observed_generation integer NOT NULL DEFAULT 0",
    "current_release varchar(64) NOT NULL DEFAULT ''",
    "endpoints jsonb NOT NULL DEFAULT '[]'",
    "suspend_reason varchar(500) NOT NULL DEFAULT ''",
    "last_error text NOT NULL DEFAULT ''",
)


def upgrade() -> None:
    for col in _INSTANCE_COLUMNS:
        op.execute(f"ALTER TABLE {S}.instances ADD COLUMN IF NOT EXISTS {col}")
    op.execute(f"CREATE INDEX IF NOT EXISTS ix_instances_account ON {S}.instances (account_id, id)")
    op.execute(f"CREATE INDEX IF NOT EXISTS ix_instances_state ON {S}.instances (state)")

    op.create_table(
        "releases",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("instance_id", sa.String(64), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("snapshot", JSONB, nullable=False),
        sa.Column("notes", sa.Text, nullable=False, server_default=""),
        sa.Column("commit_sha", sa.String(64), nullable=False, server_default=""),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", TS, nullable=False),
        # Versions are per instance and never reused.
        sa.UniqueConstraint("instance_id", "version", name="uq_releases_version"),
        schema=S,
    )
    # At most one active release per instance.
    op.create_index(
        "uq_releases_active",
        "releases",
        ["instance_id"],
        unique=True,
        schema=S,
        postgresql_where=sa.text("active"),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("instance_id", sa.String(64), nullable=False, index=True),
        sa.Column("release_id", sa.String(64), nullable=False),
        sa.Column("previous_release_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("is_rollback", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("services", JSONB, nullable=False, server_default="[]"),
        sa.Column("progress", JSONB, nullable=False, server_default="{}"),
        sa.Column("notes", sa.Text, nullable=False, server_default=""),
        sa.Column("commit_sha", sa.String(64), nullable=False, server_default=""),
        sa.Column("error", sa.Text, nullable=False, server_default=""),
        sa.Column("initiator", sa.String(128), nullable=False, server_default=""),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )
    # One rollout at a time per instance, held by the database rather than by the API's checks.
    op.create_index(
        "uq_deployments_in_flight",
        "deployments",
        ["instance_id"],
        unique=True,
        schema=S,
        postgresql_where=sa.text("state in ('pending', 'running')"),
    )
    op.create_table(
        "health_checks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("instance_id", sa.String(64), nullable=False, index=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("interval_s", sa.Float, nullable=False),
        sa.Column("timeout_s", sa.Float, nullable=False),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="unknown"),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )
    op.create_table(
        "health_results",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("check_id", sa.String(64), nullable=False, index=True),
        sa.Column("instance_id", sa.String(64), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("status_code", sa.Integer, nullable=False, server_default="0"),
        sa.Column("checked_at", TS, nullable=False),
        schema=S,
    )
    op.create_table(
        "instance_health",
        sa.Column("instance_id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )
    op.create_table(
        "providers",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("region", sa.String(64), nullable=False, server_default=""),
        sa.Column("healthy", sa.Boolean, nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("capabilities", JSONB, nullable=False, server_default="[]"),
        sa.Column("checked_at", TS, nullable=False),
        schema=S,
    )
    op.create_table(
        "cursors",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
        schema=S,
    )
