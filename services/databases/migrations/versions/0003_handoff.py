"""databases: the gateways' drain reports on their leases (handoff), the scale_state constraint

Revision ID: 0003
Revises: 0002
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "databases"


def new_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("frozen", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("busy_backends", sa.Integer, nullable=False, server_default="0"),
        sa.Column("pinned_sessions", sa.Integer, nullable=False, server_default="0"),
        sa.Column("checkout_waits", sa.BigInteger, nullable=False, server_default="0"),
    ]


def upgrade() -> None:
    for col in new_columns():
        op.add_column("leases", col, schema=S)
    op.create_check_constraint(
        "ck_databases_scale_state",
        "databases",
        "scale_state in ('STEADY','PREPARING','FREEZING','DRAINING','STOPPING_OLD','STARTING_NEW',"
        "'SWITCHING','COOLDOWN','FAILED')",
        schema=S,
    )


def downgrade() -> None:
    op.drop_constraint("ck_databases_scale_state", "databases", schema=S)
    for col in new_columns():
        op.drop_column("leases", col.name, schema=S)
