"""instances: the secret versions a release ran with (key → version), so a rollback to it runs
with those values again; NULL until the release first rolls out

Revision ID: 0004_release_secrets
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004_release_secrets"
down_revision = "0003"
branch_labels = None
depends_on = None

S = "instances"


def upgrade() -> None:
    op.add_column("releases", sa.Column("secret_versions", JSONB, nullable=True), schema=S)


def downgrade() -> None:
    op.drop_column("releases", "secret_versions", schema=S)
