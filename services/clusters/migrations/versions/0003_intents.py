"""clusters: intents, the journal of multi-service operations in flight (frozen: later changes
are migrations of their own)

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "clusters"


def upgrade() -> None:
    op.create_table(
        "intents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("app_name", sa.String(255)),
        sa.Column("app_id", sa.String(64)),
        sa.Column("pg_name", sa.String(63)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("intents", schema=S)
