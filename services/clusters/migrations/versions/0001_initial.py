"""clusters: outbox (frozen: later changes are migrations of their own)

Revision ID: 0001
Revises:
"""

from alembic import op

from libs.outbox import create_outbox_table

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_outbox_table(op, "clusters")
