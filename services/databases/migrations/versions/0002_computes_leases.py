"""databases: runtime columns, state constraints, leases, compute run intervals

Revision ID: 0002
Revises: 0001
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "databases"
TS = sa.DateTime(timezone=True)


# The owning account (plan limits count across an account's tenants), the tenant's role inside
# the compute, where the writer listens, the measured storage, and why it is in `error`.
def new_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("account_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("pg_user", sa.String(63), nullable=False, server_default=""),
        sa.Column("writer_host", sa.String(255), nullable=False, server_default=""),
        sa.Column("writer_port", sa.Integer, nullable=False, server_default="0"),
        sa.Column("storage_bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
    ]


def upgrade() -> None:
    for col in new_columns():
        op.add_column("databases", col, schema=S)
    op.create_check_constraint(
        "ck_databases_state",
        "databases",
        "state in ('creating','stopped','booting','ready','stopping','error','deleting')",
        schema=S,
    )
    op.create_check_constraint(
        "ck_databases_size", "databases", "size in ('L1','L2','L3','L4','L5')", schema=S
    )
    op.create_check_constraint(
        "ck_databases_scale", "databases", "current_scale in (0, 1) and target_scale in (0, 1)", schema=S
    )
    # A running writer has an address; a stopped one has none (the Gateway routes on these).
    op.create_check_constraint(
        "ck_databases_writer", "databases", "(state = 'ready') <= (writer_port > 0)", schema=S
    )
    op.create_index("ix_databases_account", "databases", ["account_id"], schema=S)
    op.create_index("ix_databases_state", "databases", ["state"], schema=S)
    op.create_table(
        "leases",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "db_id", sa.String(36), sa.ForeignKey(f"{S}.databases.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("holder_id", sa.String(128), nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("ttl_seconds", sa.Integer, nullable=False),
        sa.Column("active_connections", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("renewed_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.UniqueConstraint("db_id", "holder_id", name="uq_leases_db_holder"),
        schema=S,
    )
    op.create_index("ix_leases_db_expires", "leases", ["db_id", "expires_at"], schema=S)
    op.create_table(
        "compute_runs",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("db_id", sa.String(36), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("worker_id", sa.String(64), nullable=False),
        sa.Column("profile", sa.String(4), nullable=False),
        sa.Column("cu", sa.Integer, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.CheckConstraint("ended_at is null or ended_at >= started_at", name="ck_compute_runs_interval"),
        schema=S,
    )
    op.create_index("ix_compute_runs_tenant", "compute_runs", ["tenant_id", "started_at"], schema=S)
    # At most one open run per database: a writer generation is one interval.
    op.create_index(
        "ix_compute_runs_open",
        "compute_runs",
        ["db_id"],
        schema=S,
        unique=True,
        postgresql_where=sa.text("ended_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("compute_runs", schema=S)
    op.drop_table("leases", schema=S)
    for name in ("ck_databases_writer", "ck_databases_scale", "ck_databases_size", "ck_databases_state"):
        op.drop_constraint(name, "databases", schema=S)
    op.drop_index("ix_databases_state", "databases", schema=S)
    op.drop_index("ix_databases_account", "databases", schema=S)
    for col in new_columns():
        op.drop_column("databases", col.name, schema=S)
