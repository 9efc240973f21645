"""The accounts schema. ORM objects never leave the service: the servicer maps them to protos."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, MetaData, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.outbox import outbox_table

SCHEMA = "accounts"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    name: Mapped[str] = mapped_column(String(200))
    company: Mapped[str] = mapped_column(String(200), default="")
    plan: Mapped[str] = mapped_column(String(32))
    # The platform operator's own account, holder of the first global key.
    is_platform: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        UniqueConstraint("name", name="uq_tenants_name"),
        UniqueConstraint("slug", name="uq_tenants_slug"),
        UniqueConstraint("pg_user", name="uq_tenants_pg_user"),
        Index("ix_tenants_account", "account_id", "id"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey(f"{SCHEMA}.accounts.id"))
    name: Mapped[str] = mapped_column(String(128))
    slug: Mapped[str] = mapped_column(String(63))
    plan: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(String(200), default="")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)
    quota: Mapped[dict[str, int]] = mapped_column(JSONB)
    suspended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    suspend_reason: Mapped[str] = mapped_column(String(500), default="")
    pg_user: Mapped[str] = mapped_column(String(63))
    # Envelope-encrypted (libs.crypto), readable by the platform to show credentials again.
    pg_password_enc: Mapped[str] = mapped_column(Text)
    scram_verifier: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("token_hash", name="uq_api_keys_token_hash"),
        Index("ix_api_keys_account", "account_id", "id"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey(f"{SCHEMA}.accounts.id"))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey(f"{SCHEMA}.tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(16))
    can_create_tenant: Mapped[bool] = mapped_column(Boolean)
    can_create_db: Mapped[bool] = mapped_column(Boolean)
    can_scale: Mapped[bool] = mapped_column(Boolean)
    can_delete: Mapped[bool] = mapped_column(Boolean)
    can_rotate_credentials: Mapped[bool] = mapped_column(Boolean, default=False)
    # SHA-256 of the token; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    __tablename__ = "audit_entries"
    __table_args__ = (
        Index("ix_audit_tenant", "tenant_id", "id"),
        Index("ix_audit_created", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), default="")
    actor_id: Mapped[str] = mapped_column(String(128))
    actor_type: Mapped[str] = mapped_column(String(16))
    resource: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(128), default="")
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64), default="")
    service: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(200))
    trace_id: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


outbox = outbox_table(Base.metadata)
