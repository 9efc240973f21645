"""accounts: accounts, tenants, api keys, audit entries, outbox

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "accounts"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("company", sa.String(200), nullable=False, server_default=""),
        sa.Column("plan", sa.String(32), nullable=False),
        sa.Column("is_platform", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )
    op.create_index(
        "ix_accounts_platform",
        "accounts",
        ["is_platform"],
        schema=S,
        unique=True,
        postgresql_where=sa.text("is_platform"),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(64), sa.ForeignKey(f"{S}.accounts.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("slug", sa.String(63), nullable=False),
        sa.Column("plan", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("external_id", sa.String(200), nullable=False, server_default=""),
        sa.Column("metadata", JSONB, nullable=False, server_default="{}"),
        sa.Column("quota", JSONB, nullable=False),
        sa.Column("suspended_at", TS),
        sa.Column("suspend_reason", sa.String(500), nullable=False, server_default=""),
        sa.Column("pg_user", sa.String(63), nullable=False),
        sa.Column("pg_password_enc", sa.Text, nullable=False),
        sa.Column("scram_verifier", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
        sa.UniqueConstraint("slug", name="uq_tenants_slug"),
        sa.UniqueConstraint("pg_user", name="uq_tenants_pg_user"),
        sa.CheckConstraint("status in ('active','suspended','deleting')", name="ck_tenants_status"),
        schema=S,
    )
    op.create_index("ix_tenants_account", "tenants", ["account_id", "id"], schema=S)
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(64), sa.ForeignKey(f"{S}.accounts.id"), nullable=False),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey(f"{S}.tenants.id", ondelete="CASCADE")),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("can_create_tenant", sa.Boolean, nullable=False),
        sa.Column("can_create_db", sa.Boolean, nullable=False),
        sa.Column("can_scale", sa.Boolean, nullable=False),
        sa.Column("can_delete", sa.Boolean, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("expires_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS),
        sa.Column("revoked_at", TS),
        sa.UniqueConstraint("token_hash", name="uq_api_keys_token_hash"),
        sa.CheckConstraint("scope in ('global','account','tenant')", name="ck_api_keys_scope"),
        sa.CheckConstraint("(scope = 'tenant') = (tenant_id is not null)", name="ck_api_keys_tenant"),
        schema=S,
    )
    op.create_index("ix_api_keys_account", "api_keys", ["account_id", "id"], schema=S)
    op.create_table(
        "audit_entries",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("actor_id", sa.String(128), nullable=False),
        sa.Column("actor_type", sa.String(16), nullable=False),
        sa.Column("resource", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False, server_default=""),
        sa.Column("service", sa.String(32), nullable=False),
        sa.Column("method", sa.String(200), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", TS, nullable=False),
        schema=S,
    )
    op.create_index("ix_audit_tenant", "audit_entries", ["tenant_id", "id"], schema=S)
    op.create_index("ix_audit_created", "audit_entries", ["created_at"], schema=S)
    op.create_table(
        "outbox",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("tenant_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("resource", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(128), nullable=False),
        sa.Column("data", JSONB, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        schema=S,
    )
    op.create_index("ix_outbox_tenant", "outbox", ["tenant_id", "seq"], schema=S)
