"""network: every version of a secret's value kept (secret_versions), the KEK id beside each
ciphertext so a rotation finds what to re-wrap; `secrets` keeps the metadata and its current
version only

Revision ID: 0004_secrets
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_secrets"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "network"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "secret_versions",
        sa.Column("secret_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
        sa.Column("value_enc", sa.Text, nullable=False),
        sa.Column("kek_id", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["secret_id"], [f"{S}.secrets.id"], ondelete="CASCADE"),
        schema=S,
    )
    # Values stored before versions existed become their secret's current version (their KEK id
    # is unknown here; the re-wrap pass reads it from the ciphertext and corrects it).
    op.execute(
        f"INSERT INTO {S}.secret_versions (secret_id, version, tenant_id, value_enc, kek_id, created_at) "
        f"SELECT id, version, tenant_id, value_enc, '', updated_at FROM {S}.secrets"
    )
    op.drop_column("secrets", "value_enc", schema=S)


def downgrade() -> None:
    op.add_column("secrets", sa.Column("value_enc", sa.Text, nullable=False, server_default=""), schema=S)
    op.execute(
        f"UPDATE {S}.secrets s SET value_enc = v.value_enc FROM {S}.secret_versions v "
        f"WHERE v.secret_id = s.id AND v.version = s.version"
    )
    op.drop_table("secret_versions", schema=S)
