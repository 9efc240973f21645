"""databases: databases, outbox (frozen: later changes are migrations of their own)

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

S = "databases"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "databases",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("size", sa.String(4), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("timeline", sa.String(32), nullable=False),
        sa.Column("worker_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("active_connections", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_used_at", TS),
        sa.Column("current_scale", sa.Integer, nullable=False, server_default="0"),
        sa.Column("target_scale", sa.Integer, nullable=False, server_default="0"),
        sa.Column("current_profile", sa.String(4), nullable=False),
        sa.Column("target_profile", sa.String(4), nullable=False),
        sa.Column("candidate_profile", sa.String(4)),
        sa.Column("candidate_worker_id", sa.String(64)),
        sa.Column("candidate_writer_term", sa.BigInteger),
        sa.Column("scale_state", sa.String(16), nullable=False, server_default="STEADY"),
        sa.Column("freeze_new_checkouts", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("lease_control_epoch", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("autoscale_cooldown_until", TS),
        sa.Column("scale_phase_started_at", TS),
        sa.Column("scale_phase_deadline_at", TS),
        sa.Column("scale_failure_reason", sa.String(200)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("tenant_id", "name", name="uq_databases_tenant_name"),
        schema=S,
    )
    create_outbox_table(op, S)
