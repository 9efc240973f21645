"""databases: databases, outbox

Revision ID: 0001
Revises:
"""

from alembic import op

from services.databases.models import databases, outbox

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The initial tables are created from their frozen definitions; later changes are ALTERs.
    bind = op.get_bind()
    databases.create(bind)
    outbox.create(bind)
