"""Transport for accounts: proto ⇄ domain, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from ctrlmesh.accounts.v1 import accounts_pb2 as pb
from ctrlmesh.accounts.v1 import accounts_pb2_grpc as rpc
from ctrlmesh.common.v1 import common_pb2, internal_pb2
from google.protobuf import empty_pb2, json_format, struct_pb2

from libs import principal as principals
from libs.protoconv import dt, ts
from services.accounts import events
from services.accounts.domain import PERMISSIONS, PLANS, AccountsDomain, TenantView
from services.accounts.models import Account, ApiKey, AuditEntry, Tenant

# Trailing metadata telling the edge to forget cached principals of a key (see gateway/auth.py).
INVALIDATE_KEY = "x-ctrlmesh-invalidate-key"


def profile(a: Account) -> pb.AccountProfile:
    return pb.AccountProfile(
        account_id=a.id,
        email=a.email,
        name=a.name,
        company=a.company,
        plan=a.plan,
        created_at=ts(a.created_at),
        updated_at=ts(a.updated_at),
    )


def api_key(k: ApiKey, tenant: str, token: str | None = None) -> pb.ApiKey:
    msg = pb.ApiKey(
        id=k.id,
        name=k.name,
        scope=k.scope,
        account_id=k.account_id,
        tenant=tenant,
        tenant_id=k.tenant_id or "",
        permissions=common_pb2.Permissions(**{p: getattr(k, p) for p in PERMISSIONS}),
        expires_at=ts(k.expires_at),
        created_at=ts(k.created_at),
        last_used_at=ts(k.last_used_at),
        prefix=k.prefix,
    )
    if token is not None:
        msg.key = token
    return msg


def tenant(t: Tenant, db_count: int = 0) -> pb.Tenant:
    md = struct_pb2.Struct()
    md.update(t.metadata_ or {})
    return pb.Tenant(
        id=t.id,
        name=t.name,
        slug=t.slug,
        account_id=t.account_id,
        status=t.status,
        plan=t.plan,
        external_id=t.external_id,
        metadata=md,
        quota=common_pb2.Quota(**t.quota),
        suspended_at=ts(t.suspended_at),
        suspend_reason=t.suspend_reason,
        db_count=db_count,
        created_at=ts(t.created_at),
        updated_at=ts(t.updated_at),
        pg_user=t.pg_user,
    )


def view(v: TenantView) -> pb.Tenant:
    return tenant(v.tenant, v.db_count)


def plan_limits(name: str) -> pb.PlanLimits:
    p = PLANS.get(name, PLANS["standard_payg"])
    return pb.PlanLimits(
        max_tenants=p.max_tenants,
        max_databases=p.max_databases,
        max_compute_cu_hours=p.max_compute_cu_hours,
        max_egress_bytes=p.max_egress_bytes,
        sizes=list(p.sizes),
    )


def audit_entry(e: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        id=e.id,
        tenant_id=e.tenant_id,
        actor_id=e.actor_id,
        actor_type=e.actor_type,
        resource=e.resource,
        resource_id=e.resource_id,
        action=e.action,
        outcome=e.outcome,
        reason=e.reason,
        service=e.service,
        method=e.method,
        trace_id=e.trace_id,
        created_at=ts(e.created_at),
    )


class AccountService(rpc.AccountServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def GetProfile(self, request, context):  # type: ignore[no-untyped-def]
        return profile(await self.d.get_account(principals.current()))

    async def UpdateContact(self, request, context):  # type: ignore[no-untyped-def]
        return profile(
            await self.d.update_contact(principals.current(), request.email, request.name, request.company)
        )

    async def GetBillingSummary(self, request, context):  # type: ignore[no-untyped-def]
        acct, plan, usage, start, end = await self.d.billing(principals.current())
        limits = plan_limits(acct.plan)
        used = pb.Usage(
            tenants=usage["tenants"],
            databases=usage["databases"],
            compute_cu_hours=usage["compute_cu_hours"],
            compute_cu_hours_by_profile=usage["by_profile"],
            storage_bytes=usage["storage_bytes"],
            egress_bytes=usage["egress_bytes"],
        )
        percent: dict[str, float] = {}
        for key, cap, value in (
            ("tenants", plan.max_tenants, usage["tenants"]),
            ("databases", plan.max_databases, usage["databases"]),
            ("compute_cu_hours", plan.max_compute_cu_hours, usage["compute_cu_hours"]),
            ("egress_bytes", plan.max_egress_bytes, usage["egress_bytes"]),
        ):
            if cap and usage["account_wide"]:
                percent[key] = round(100.0 * value / cap, 2)
        return pb.BillingSummary(
            plan=acct.plan,
            period_start=ts(start),
            period_end=ts(end),
            limits=limits,
            usage=used,
            limit_used_percent=percent,
            estimate=True,
        )

    async def CreateAccount(self, request, context):  # type: ignore[no-untyped-def]
        acct, key, token = await self.d.create_account(
            principals.current(), request.email, request.name, request.company, request.plan
        )
        return pb.CreateAccountResponse(account=profile(acct), api_key=api_key(key, "", token))


class ApiKeyService(rpc.ApiKeyServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def GetCurrentApiKey(self, request, context):  # type: ignore[no-untyped-def]
        p = principals.current()
        key, tname = await self.d.get_key(p, p.key_id)
        return api_key(key, tname)

    async def CreateApiKey(self, request, context):  # type: ignore[no-untyped-def]
        perms = {p: getattr(request.permissions, p) for p in PERMISSIONS}
        key, tname, token = await self.d.create_key(
            principals.current(),
            request.name,
            request.scope,
            request.tenant,
            perms,
            dt(request.expires_at, request.HasField("expires_at")),
            request.account_id,
        )
        return api_key(key, tname, token)

    async def ListApiKeys(self, request, context):  # type: ignore[no-untyped-def]
        rows, total = await self.d.list_keys(principals.current(), request.limit, request.offset)
        return pb.ListApiKeysResponse(items=[api_key(k, t) for k, t in rows], total=total)

    async def RevokeApiKey(self, request, context):  # type: ignore[no-untyped-def]
        await self.d.revoke_key(principals.current(), request.key_id)
        context.set_trailing_metadata(((INVALIDATE_KEY, request.key_id),))
        return empty_pb2.Empty()

    async def Authenticate(self, request, context):  # type: ignore[no-untyped-def]
        if not principals.is_system(principals.current()):
            from libs.errors import PermissionDenied

            raise PermissionDenied("internal RPC")
        key, acct = await self.d.authenticate(request.token)
        return common_pb2.Principal(
            key_id=key.id,
            account_id=key.account_id,
            scope=key.scope,
            tenant_id=key.tenant_id or "",
            permissions=common_pb2.Permissions(**{p: getattr(key, p) for p in PERMISSIONS}),
            plan=acct.plan,
            expires_at_unix=int(key.expires_at.timestamp()) if key.expires_at else 0,
        )


class TenantService(rpc.TenantServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def CreateTenant(self, request, context):  # type: ignore[no-untyped-def]
        c = await self.d.create_tenant(principals.current(), request.name)
        return pb.CreateTenantResponse(
            tenant=tenant(c.tenant),
            pg_user=c.tenant.pg_user,
            pg_password=c.pg_password,
            dsn_template=self.d.dsn_template(c.tenant.pg_user, c.pg_password),
        )

    async def ListTenants(self, request, context):  # type: ignore[no-untyped-def]
        views, total = await self.d.list_tenants(principals.current(), request.limit, request.offset)
        return pb.ListTenantsResponse(items=[view(v) for v in views], total=total)

    async def GetTenant(self, request, context):  # type: ignore[no-untyped-def]
        return view(await self.d.get_tenant(principals.current(), request.tenant))

    async def GetTenantCredentials(self, request, context):  # type: ignore[no-untyped-def]
        t, password = await self.d.credentials(principals.current(), request.tenant)
        return pb.TenantCredentials(
            tenant=t.name,
            pg_user=t.pg_user,
            pg_password=password,
            dsn_template=self.d.dsn_template(t.pg_user, password),
        )

    async def RotateTenantCredentials(self, request, context):  # type: ignore[no-untyped-def]
        t, password = await self.d.rotate_credentials(principals.current(), request.tenant)
        return pb.TenantCredentials(
            tenant=t.name,
            pg_user=t.pg_user,
            pg_password=password,
            dsn_template=self.d.dsn_template(t.pg_user, password),
        )

    async def DeleteTenant(self, request, context):  # type: ignore[no-untyped-def]
        t = await self.d.delete_tenant(principals.current(), request.tenant, request.cascade)
        return pb.DeleteTenantResponse(tenant=tenant(t) if t is not None else None)

    async def ResolveTenant(self, request, context):  # type: ignore[no-untyped-def]
        return view(await self.d.resolve(principals.current(), request.tenant))

    async def LookupPgCredentials(self, request, context):  # type: ignore[no-untyped-def]
        t, password = await self.d.pg_credentials(principals.current(), request.pg_user)
        return pb.PgCredentials(
            tenant_id=t.id,
            tenant=t.name,
            pg_user=t.pg_user,
            scram_verifier=t.scram_verifier,
            status=t.status,
            pg_password=password,
        )

    async def GetTenantLimits(self, request, context):  # type: ignore[no-untyped-def]
        t, acct = await self.d.limits(principals.current(), request.tenant_id)
        return pb.TenantLimits(
            tenant_id=t.id,
            status=t.status,
            quota=common_pb2.Quota(**t.quota),
            account_plan=acct.plan,
            plan_limits=plan_limits(acct.plan),
        )


class AdminService(rpc.AdminServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        return pb.SystemStats(**await self.d.stats(principals.current()))

    async def CreateTenant(self, request, context):  # type: ignore[no-untyped-def]
        c = await self.d.create_tenant(
            principals.current(),
            request.name,
            slug=request.slug,
            plan=request.plan,
            external_id=request.external_id,
            quota=json_format.MessageToDict(
                request.quota, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            if request.HasField("quota")
            else None,
            metadata=json_format.MessageToDict(request.metadata) if request.HasField("metadata") else None,
            account_id=request.account_id,
            admin=True,
        )
        return tenant(c.tenant)

    async def ListTenants(self, request, context):  # type: ignore[no-untyped-def]
        rows, cursor, total = await self.d.admin_list(
            principals.current(), request.status, request.cursor, request.limit
        )
        return pb.AdminListTenantsResponse(items=[tenant(t) for t in rows], next_cursor=cursor, total=total)

    async def GetTenant(self, request, context):  # type: ignore[no-untyped-def]
        return view(await self.d.admin_get(principals.current(), request.id))

    async def UpdateTenant(self, request, context):  # type: ignore[no-untyped-def]
        changes = {f: getattr(request, f) for f in ("name", "plan", "external_id") if request.HasField(f)}
        if request.HasField("metadata"):
            changes["metadata"] = json_format.MessageToDict(request.metadata)
        return view(await self.d.admin_update(principals.current(), request.id, changes))

    async def DeleteTenant(self, request, context):  # type: ignore[no-untyped-def]
        t = await self.d.delete_tenant(principals.current(), request.id, request.cascade, admin=True)
        return pb.DeleteTenantResponse(tenant=tenant(t) if t is not None else None)

    async def SuspendTenant(self, request, context):  # type: ignore[no-untyped-def]
        await self.d.set_suspended(principals.current(), request.id, True, request.reason)
        return empty_pb2.Empty()

    async def UnsuspendTenant(self, request, context):  # type: ignore[no-untyped-def]
        await self.d.set_suspended(principals.current(), request.id, False, request.reason)
        return empty_pb2.Empty()

    async def GetQuota(self, request, context):  # type: ignore[no-untyped-def]
        t, used = await self.d.get_quota(principals.current(), request.id)
        fields = common_pb2.QuotaUsed.DESCRIPTOR.fields_by_name
        return pb.QuotaUsage(
            tenant=t.id,
            quota=common_pb2.Quota(**t.quota),
            used=common_pb2.QuotaUsed(**{k: v for k, v in used.items() if k in fields}),
        )

    async def SetQuota(self, request, context):  # type: ignore[no-untyped-def]
        quota = json_format.MessageToDict(
            request.quota, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        await self.d.set_quota(principals.current(), request.id, {k: int(v) for k, v in quota.items()})
        return empty_pb2.Empty()

    async def QueryAuditLog(self, request, context):  # type: ignore[no-untyped-def]
        filters = {
            "tenant_id": request.tenant_id,
            "resource": request.resource,
            "action": request.action,
            "actor_id": request.actor_id,
            "since": dt(request.since, request.HasField("since")),
            "until": dt(request.until, request.HasField("until")),
        }
        rows, cursor, total = await self.d.query_audit(
            principals.current(), filters, request.cursor, request.limit
        )
        return pb.QueryAuditLogResponse(items=[audit_entry(e) for e in rows], next_cursor=cursor, total=total)


class AuditService(rpc.AuditServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def RecordAudit(self, request, context):  # type: ignore[no-untyped-def]
        if not principals.is_system(principals.current()):
            from libs.errors import PermissionDenied

            raise PermissionDenied("internal RPC")
        entry = json_format.MessageToDict(
            request, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        entry.pop("id", None)
        entry.pop("created_at", None)
        await self.d.record_audit(entry)
        return empty_pb2.Empty()


class EventService(rpc.EventServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def WatchEvents(self, request, context) -> AsyncIterator[internal_pb2.Event]:  # type: ignore[no-untyped-def,override]
        # Accounts' events merged with the databases service's (services/accounts/events.py).
        async for event in events.watch(
            self.d, principals.current(), request.last_event_id, list(request.type)
        ):
            yield event


def register(server: grpc.aio.Server, domain: AccountsDomain) -> list[str]:
    rpc.add_AccountServiceServicer_to_server(AccountService(domain), server)
    rpc.add_ApiKeyServiceServicer_to_server(ApiKeyService(domain), server)
    rpc.add_TenantServiceServicer_to_server(TenantService(domain), server)
    rpc.add_AdminServiceServicer_to_server(AdminService(domain), server)
    rpc.add_AuditServiceServicer_to_server(AuditService(domain), server)
    rpc.add_EventServiceServicer_to_server(EventService(domain), server)
    return [s.full_name for s in pb.DESCRIPTOR.services_by_name.values()]
