"""Transport for accounts: proto ⇄ domain, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from ctrlmesh.accounts.v1 import accounts_pb2 as pb
from ctrlmesh.accounts.v1 import accounts_pb2_grpc as rpc
from ctrlmesh.common.v1 import common_pb2, internal_pb2
from google.protobuf import empty_pb2, json_format, struct_pb2
from google.protobuf.message import Message

from libs import principal as principals
from libs.events import decode_cursor
from libs.grpc_server import open_stream
from libs.protoconv import dt, ts
from services.accounts import events
from services.accounts.billing import BillingSummary, Plan
from services.accounts.domain import AccountsDomain
from services.accounts.keys import PERMISSIONS, KeyView, permissions_of
from services.accounts.repository import AccountRow, AuditRow, KeyRow, TenantRow
from services.accounts.tenants import Credentials, TenantView

# Trailing metadata telling the edge to forget cached principals of a key (see gateway/auth.py).
INVALIDATE_KEY = "x-ctrlmesh-invalidate-key"


def profile(a: AccountRow) -> pb.AccountProfile:
    return pb.AccountProfile(
        account_id=a.id,
        email=a.email,
        name=a.name,
        company=a.company,
        plan=a.plan,
        created_at=ts(a.created_at),
        updated_at=ts(a.updated_at),
    )


def permissions(k: KeyRow) -> common_pb2.Permissions:
    return common_pb2.Permissions(**permissions_of(k))


def api_key(v: KeyView, token: str | None = None) -> pb.ApiKey:
    k = v.key
    msg = pb.ApiKey(
        id=k.id,
        name=k.name,
        scope=k.scope,
        account_id=k.account_id,
        tenant=v.tenant,
        tenant_id=k.tenant_id or "",
        permissions=permissions(k),
        expires_at=ts(k.expires_at),
        created_at=ts(k.created_at),
        last_used_at=ts(k.last_used_at),
        prefix=k.prefix,
    )
    if token is not None:
        msg.key = token
    return msg


def quota(t: TenantRow) -> common_pb2.Quota:
    return common_pb2.Quota(**t.quota)


def tenant(t: TenantRow, db_count: int = 0) -> pb.Tenant:
    md = struct_pb2.Struct()
    md.update(t.metadata or {})
    return pb.Tenant(
        id=t.id,
        name=t.name,
        slug=t.slug,
        account_id=t.account_id,
        status=t.status,
        plan=t.plan,
        external_id=t.external_id,
        metadata=md,
        quota=quota(t),
        suspended_at=ts(t.suspended_at),
        suspend_reason=t.suspend_reason,
        db_count=db_count,
        created_at=ts(t.created_at),
        updated_at=ts(t.updated_at),
        pg_user=t.pg_user,
    )


def view(v: TenantView) -> pb.Tenant:
    return tenant(v.tenant, v.db_count)


def login(c: Credentials) -> dict[str, str]:
    """The login fields TenantCredentials and CreateTenantResponse share."""
    return {"pg_user": c.tenant.pg_user, "pg_password": c.pg_password, "dsn_template": c.dsn_template}


def credentials(c: Credentials) -> pb.TenantCredentials:
    return pb.TenantCredentials(tenant=c.tenant.name, **login(c))


def deleted(t: TenantRow | None) -> pb.DeleteTenantResponse:
    """The tenant as the delete left it: `deleting` while a cascade runs, none once it is gone."""
    return pb.DeleteTenantResponse(tenant=tenant(t) if t is not None else None)


def plan_limits(p: Plan) -> pb.PlanLimits:
    return pb.PlanLimits(
        max_tenants=p.max_tenants,
        max_databases=p.max_databases,
        max_compute_cu_hours=p.max_compute_cu_hours,
        max_egress_bytes=p.max_egress_bytes,
        sizes=list(p.sizes),
    )


def billing_summary(b: BillingSummary) -> pb.BillingSummary:
    u = b.usage
    return pb.BillingSummary(
        plan=b.account_plan,
        period_start=ts(b.period_start),
        period_end=ts(b.period_end),
        limits=plan_limits(b.plan),
        usage=pb.Usage(
            tenants=u.tenants,
            databases=u.databases,
            compute_cu_hours=u.compute_cu_hours,
            compute_cu_hours_by_profile=u.by_profile,
            storage_bytes=u.storage_bytes,
            egress_bytes=u.egress_bytes,
        ),
        limit_used_percent=b.limit_used_percent,
        estimate=True,
    )


def audit_entry(e: AuditRow) -> pb.AuditEntry:
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


def as_dict(msg: Message) -> dict[str, Any]:
    """A message as JSON-shaped data with proto field names, unset fields included."""
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class AccountService(rpc.AccountServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def GetProfile(
        self, request: pb.GetProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AccountProfile:
        return profile(await self.d.accounts.get_account(principals.current()))

    async def UpdateContact(
        self, request: pb.UpdateContactRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AccountProfile:
        return profile(
            await self.d.accounts.update_contact(
                principals.current(), request.email, request.name, request.company
            )
        )

    async def GetBillingSummary(
        self, request: pb.GetBillingSummaryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.BillingSummary:
        return billing_summary(await self.d.billing.summary(principals.current()))

    async def CreateAccount(
        self, request: pb.CreateAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateAccountResponse:
        acct, key, token = await self.d.accounts.create_account(
            principals.current(), request.email, request.name, request.company, request.plan
        )
        return pb.CreateAccountResponse(account=profile(acct), api_key=api_key(KeyView(key), token))


class ApiKeyService(rpc.ApiKeyServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def GetCurrentApiKey(
        self, request: pb.GetCurrentApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ApiKey:
        p = principals.current()
        return api_key(await self.d.keys.get_key(p, p.key_id))

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ApiKey:
        key, token = await self.d.keys.create_key(
            principals.current(),
            request.name,
            request.scope,
            request.tenant,
            {p: getattr(request.permissions, p) for p in PERMISSIONS},
            dt(request.expires_at, request.HasField("expires_at")),
            request.account_id,
        )
        return api_key(key, token)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListApiKeysResponse:
        rows, total = await self.d.keys.list_keys(principals.current(), request.limit, request.offset)
        return pb.ListApiKeysResponse(items=[api_key(v) for v in rows], total=total)

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.keys.revoke_key(principals.current(), request.key_id)
        context.set_trailing_metadata(((INVALIDATE_KEY, request.key_id),))
        return empty_pb2.Empty()

    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Principal:
        key, acct = await self.d.keys.authenticate(principals.current(), request.token)
        return common_pb2.Principal(
            key_id=key.id,
            account_id=key.account_id,
            scope=key.scope,
            tenant_id=key.tenant_id or "",
            permissions=permissions(key),
            plan=acct.plan,
            expires_at_unix=int(key.expires_at.timestamp()) if key.expires_at else 0,
        )


class TenantService(rpc.TenantServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateTenantResponse:
        c = await self.d.tenants.create_tenant(principals.current(), request.name)
        return pb.CreateTenantResponse(tenant=tenant(c.tenant), **login(c))

    async def ListTenants(
        self, request: pb.ListTenantsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTenantsResponse:
        views, total = await self.d.tenants.list_tenants(principals.current(), request.limit, request.offset)
        return pb.ListTenantsResponse(items=[view(v) for v in views], total=total)

    async def GetTenant(
        self, request: pb.GetTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Tenant:
        return view(await self.d.tenants.get_tenant(principals.current(), request.tenant))

    async def GetTenantCredentials(
        self, request: pb.GetTenantCredentialsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TenantCredentials:
        return credentials(await self.d.tenants.credentials(principals.current(), request.tenant))

    async def RotateTenantCredentials(
        self, request: pb.RotateTenantCredentialsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TenantCredentials:
        return credentials(await self.d.tenants.rotate_credentials(principals.current(), request.tenant))

    async def DeleteTenant(
        self, request: pb.DeleteTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteTenantResponse:
        t = await self.d.tenants.delete_tenant(principals.current(), request.tenant, request.cascade)
        return deleted(t)

    async def ResolveTenant(
        self, request: pb.ResolveTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Tenant:
        return view(await self.d.tenants.resolve(principals.current(), request.tenant))

    async def LookupPgCredentials(
        self, request: pb.LookupPgCredentialsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PgCredentials:
        c = await self.d.tenants.pg_credentials(principals.current(), request.pg_user)
        t = c.tenant
        return pb.PgCredentials(
            tenant_id=t.id,
            tenant=t.name,
            pg_user=t.pg_user,
            scram_verifier=t.scram_verifier,
            status=t.status,
            pg_password=c.pg_password,
        )

    async def GetTenantLimits(
        self, request: pb.GetTenantLimitsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TenantLimits:
        lim = await self.d.tenants.limits(principals.current(), request.tenant_id)
        return pb.TenantLimits(
            tenant_id=lim.tenant.id,
            status=lim.tenant.status,
            quota=quota(lim.tenant),
            account_plan=lim.account_plan,
            plan_limits=plan_limits(lim.plan),
        )


class AdminService(rpc.AdminServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SystemStats:
        return pb.SystemStats(**await self.d.stats.system_stats(principals.current()))

    async def CreateTenant(
        self, request: pb.AdminCreateTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Tenant:
        c = await self.d.tenants.create_tenant(
            principals.current(),
            request.name,
            slug=request.slug,
            plan=request.plan,
            external_id=request.external_id,
            quota=as_dict(request.quota) if request.HasField("quota") else None,
            metadata=json_format.MessageToDict(request.metadata) if request.HasField("metadata") else None,
            account_id=request.account_id,
            admin=True,
        )
        return tenant(c.tenant)

    async def ListTenants(
        self, request: pb.AdminListTenantsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AdminListTenantsResponse:
        rows, cursor, total = await self.d.tenants.admin_list(
            principals.current(), request.status, request.cursor, request.limit
        )
        return pb.AdminListTenantsResponse(items=[tenant(t) for t in rows], next_cursor=cursor, total=total)

    async def GetTenant(
        self, request: pb.AdminGetTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Tenant:
        return view(await self.d.tenants.admin_get(principals.current(), request.id))

    async def UpdateTenant(
        self, request: pb.AdminUpdateTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Tenant:
        changes: dict[str, Any] = {
            f: getattr(request, f) for f in ("name", "plan", "external_id") if request.HasField(f)
        }
        if request.HasField("metadata"):
            changes["metadata"] = json_format.MessageToDict(request.metadata)
        return view(await self.d.tenants.admin_update(principals.current(), request.id, changes))

    async def DeleteTenant(
        self, request: pb.AdminDeleteTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteTenantResponse:
        t = await self.d.tenants.delete_tenant(principals.current(), request.id, request.cascade, admin=True)
        return deleted(t)

    async def SuspendTenant(
        self, request: pb.SuspendTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.tenants.set_suspended(principals.current(), request.id, True, request.reason)
        return empty_pb2.Empty()

    async def UnsuspendTenant(
        self, request: pb.UnsuspendTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.tenants.set_suspended(principals.current(), request.id, False, request.reason)
        return empty_pb2.Empty()

    async def GetQuota(
        self, request: pb.GetQuotaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.QuotaUsage:
        t, used = await self.d.tenants.get_quota(principals.current(), request.id)
        fields = common_pb2.QuotaUsed.DESCRIPTOR.fields_by_name
        return pb.QuotaUsage(
            tenant=t.id,
            quota=quota(t),
            used=common_pb2.QuotaUsed(**{k: v for k, v in used.items() if k in fields}),
        )

    async def SetQuota(
        self, request: pb.SetQuotaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        quota = {k: int(v) for k, v in as_dict(request.quota).items()}
        await self.d.tenants.set_quota(principals.current(), request.id, quota)
        return empty_pb2.Empty()

    async def QueryAuditLog(
        self, request: pb.QueryAuditLogRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.QueryAuditLogResponse:
        filters = {
            "tenant_id": request.tenant_id,
            "resource": request.resource,
            "action": request.action,
            "actor_id": request.actor_id,
            "since": dt(request.since, request.HasField("since")),
            "until": dt(request.until, request.HasField("until")),
        }
        rows, cursor, total = await self.d.audit.query(
            principals.current(), filters, request.cursor, request.limit
        )
        return pb.QueryAuditLogResponse(items=[audit_entry(e) for e in rows], next_cursor=cursor, total=total)


class AuditService(rpc.AuditServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def RecordAudit(
        self, request: pb.AuditEntry, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        entry = as_dict(request)
        entry.pop("id", None)
        entry.pop("created_at", None)
        await self.d.audit.record_from(principals.current(), entry)
        return empty_pb2.Empty()


class EventService(rpc.EventServiceServicer):
    def __init__(self, domain: AccountsDomain):
        self.d = domain

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[internal_pb2.Event]:
        # Every service's events, merged (services/accounts/events.py); a malformed resume id
        # is 400 before the stream opens.
        decode_cursor(request.last_event_id)
        await open_stream(context)
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
