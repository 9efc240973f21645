"""instances: reconcile claims, so several instances-service processes never drive one instance

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "instances"


def upgrade() -> None:
    op.create_table(
        "reconcile_claims",
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("reconcile_claims", schema=S)
