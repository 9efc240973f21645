"""accounts: the can_rotate_credentials permission flag on API keys

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "accounts"


def upgrade() -> None:
    # Existing keys do not gain the right: account and global keys rotate without the flag anyway.
    op.add_column(
        "api_keys",
        sa.Column("can_rotate_credentials", sa.Boolean, nullable=False, server_default=sa.false()),
        schema=S,
    )


def downgrade() -> None:
    op.drop_column("api_keys", "can_rotate_credentials", schema=S)
