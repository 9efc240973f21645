"""network: domains, secrets, outbox

Revision ID: 0001
Revises:
"""

from alembic import op

from services.network.models import domains, outbox, secrets

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    for table in (domains, secrets, outbox):
        table.create(bind)
