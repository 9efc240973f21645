"""clusters: outbox

Revision ID: 0001
Revises:
"""

from alembic import op

from services.clusters.models import outbox

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    outbox.create(op.get_bind())
