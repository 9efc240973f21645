"""Transport for instances: proto ⇄ domain, nothing else."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from ctrlmesh.instances.v1 import instances_pb2 as pb
from ctrlmesh.instances.v1 import instances_pb2_grpc as rpc
from google.protobuf import duration_pb2, empty_pb2, json_format, struct_pb2

from libs import principal as principals
from libs.errors import CtrlmeshError
from libs.grpc_server import open_stream
from libs.protoconv import ts
from services.instances import specs
from services.instances.deployments import DeploymentsDomain
from services.instances.domain import InstancesDomain
from services.instances.health import HealthDomain
from services.instances.otlp.queries import Point, Sample, TraceGroup
from services.instances.provider_status import ProvidersDomain
from services.instances.repository import Deployment, HealthCheck, HealthResult, Instance, Release
from services.instances.telemetry import Dashboard, Entry, Snapshot, TelemetryDomain


def dur_s(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def dur_ms(ms: float) -> duration_pb2.Duration:
    return dur_s(ms / 1000.0)


def as_dict(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def when(msg: Any, name: str) -> datetime | None:
    return getattr(msg, name).ToDatetime(tzinfo=UTC) if msg.HasField(name) else None


def seconds(msg: Any, name: str) -> float | None:
    """A Duration field in seconds; None when unset (the domain picks the default)."""
    return getattr(msg, name).ToTimedelta().total_seconds() if msg.HasField(name) else None


# -- rows → protos ----------------------------------------------------------------------------


def resources(r: dict[str, Any]) -> pb.Resources:
    return pb.Resources(
        cpu_millis=r.get("cpu_millis", 0), memory_mb=r.get("memory_mb", 0), disk_mb=r.get("disk_mb", 0)
    )


def service_spec(s: dict[str, Any]) -> pb.ServiceSpec:
    return pb.ServiceSpec(
        name=s["name"],
        image=s["image"],
        role=s["role"],
        resources=resources(s["resources"]),
        env=s["env"],
        ports=[pb.Port(**p) for p in s["ports"]],
        command=s["command"],
        args=s["args"],
    )


def instance(row: Instance) -> pb.Instance:
    services = row.spec.get("services") or []
    main = specs.main_service(services) if services else None
    # The main service's ports, each with the host port of its first serving replica.
    host: dict[int, int] = {}
    for e in row.endpoints:
        if main is not None and e["service_name"] == main["name"]:
            host.setdefault(e.get("container_port", 0), e["port"])
    ports = [
        pb.Port(
            container_port=p["container_port"],
            protocol=p["protocol"],
            host_port=host.get(p["container_port"], 0),
        )
        for p in (main["ports"] if main else [])
    ]
    return pb.Instance(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.name,
        slug=row.slug,
        provider_name=row.provider_name,
        cluster_id=row.cluster_id,
        state=row.state,
        state_reason=row.last_error,
        image=row.image,
        resources=resources(main["resources"]) if main else None,
        replicas=row.replicas,
        ports=ports,
        env=main["env"] if main else {},
        labels=row.labels,
        services=[service_spec(s) for s in services],
        endpoints=[
            pb.Endpoint(
                service_name=e["service_name"],
                url=e["url"],
                port=e["port"],
                protocol=e["protocol"],
                public=e["public"],
            )
            for e in row.endpoints
        ],
        current_release=row.current_release,
        suspended_at=ts(row.suspended_at),
        suspend_reason=row.suspend_reason,
        created_at=ts(row.created_at),
        updated_at=ts(row.updated_at),
    )


def deployment(row: Deployment) -> pb.Deployment:
    prog = row.progress or {}
    main = row.services[0] if row.services else {}
    return pb.Deployment(
        id=row.id,
        tenant_id=row.tenant_id,
        instance_id=row.instance_id,
        release_id=row.release_id,
        state=row.state,
        strategy=row.strategy,
        image=main.get("image", ""),
        env=main.get("env") or {},
        notes=row.notes,
        commit_sha=row.commit_sha,
        progress=pb.DeploymentProgress(
            total_replicas=prog.get("total_replicas", 0),
            ready_replicas=prog.get("ready_replicas", 0),
            replaced_replicas=prog.get("replaced_replicas", 0),
            services=prog.get("services") or {},
            message=prog.get("message", ""),
        ),
        error=row.error,
        initiator=row.initiator,
        started_at=ts(row.started_at),
        finished_at=ts(row.finished_at),
        created_at=ts(row.created_at),
        updated_at=ts(row.updated_at),
        services=[
            pb.ServiceDeploySpec(name=s["name"], image=s["image"], env=s.get("env") or {})
            for s in row.services
        ],
    )


def release(row: Release) -> pb.Release:
    services = row.snapshot["services"]
    main = specs.main_service(services)
    return pb.Release(
        id=row.id,
        tenant_id=row.tenant_id,
        instance_id=row.instance_id,
        version=row.version,
        image=main["image"],
        env=main["env"],
        services=[service_spec(s) for s in services],
        resources=resources(main["resources"]),
        replicas=row.snapshot.get("replicas", 1),
        notes=row.notes,
        commit_sha=row.commit_sha,
        active=row.active,
        created_at=ts(row.created_at),
        secret_versions=row.secret_versions or {},
    )


def check(row: HealthCheck) -> pb.HealthCheck:
    return pb.HealthCheck(
        id=row.id,
        tenant_id=row.tenant_id,
        instance_id=row.instance_id,
        name=row.name,
        type=row.type,
        target=row.target,
        interval=dur_s(row.interval_s),
        timeout=dur_s(row.timeout_s),
        retries=row.retries,
        enabled=row.enabled,
        created_at=ts(row.created_at),
        updated_at=ts(row.updated_at),
    )


def result(row: HealthResult) -> pb.HealthResult:
    return pb.HealthResult(
        id=row.id,
        check_id=row.check_id,
        instance_id=row.instance_id,
        status=row.status,
        latency=dur_ms(row.latency_ms),
        message=row.message,
        status_code=row.status_code,
        checked_at=ts(row.checked_at),
    )


def snapshot(s: Snapshot) -> pb.ResourceSnapshot:
    u = s.usage
    return pb.ResourceSnapshot(
        instance_id=s.instance.id,
        tenant_id=s.instance.tenant_id,
        cpu_percent=u.cpu_percent,
        memory_used_mb=u.memory_used_mb,
        memory_limit_mb=u.memory_limit_mb,
        network_in_mb=u.network_in_mb,
        network_out_mb=u.network_out_mb,
        timestamp=ts(s.taken_at),
    )


def sample(inst: Instance, x: Sample) -> pb.ResourceSnapshot:
    return pb.ResourceSnapshot(
        instance_id=inst.id,
        tenant_id=inst.tenant_id,
        cpu_percent=x.cpu_percent,
        memory_used_mb=x.memory_used_mb,
        memory_limit_mb=x.memory_limit_mb,
        network_in_mb=x.network_in_mb,
        network_out_mb=x.network_out_mb,
        timestamp=ts(x.time),
    )


def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(d)
    return out


_METRIC_TYPES = {"sum": "counter", "gauge": "gauge"}


def metric(inst: Instance, x: Point) -> pb.Metric:
    kind = _METRIC_TYPES.get(x.type, x.type)
    if x.type == "sum" and not x.monotonic:
        kind = "updown_counter"
    return pb.Metric(
        instance_id=inst.id,
        tenant_id=inst.tenant_id,
        name=x.name,
        type=kind,
        value=x.value,
        labels={k: v if isinstance(v, str) else json.dumps(v) for k, v in x.attributes.items()},
        timestamp=ts(x.time),
        unit=x.unit,
        count=x.count,
        bucket_bounds=x.bounds,
        bucket_counts=x.bucket_counts,
        temporality=x.temporality,
    )


def traces(inst: Instance, groups: list[TraceGroup]) -> pb.ListTracesResponse:
    out = pb.ListTracesResponse(total=len(groups))
    for g in groups:
        out.traces.append(
            pb.TraceSummary(
                trace_id=g.trace_id,
                root_operation=g.root_name,
                start_time=ts(g.start_time),
                duration=dur_s(g.duration_ns / 1e9),
                span_count=len(g.spans),
                error=any(sp.status == "error" for sp in g.spans),
            )
        )
        for sp in g.spans:
            out.items.append(
                pb.Trace(
                    instance_id=inst.id,
                    tenant_id=inst.tenant_id,
                    trace_id=sp.trace_id,
                    span_id=sp.span_id,
                    parent_id=sp.parent_span_id,
                    operation=sp.name,
                    duration=dur_s(sp.duration_ns / 1e9),
                    status="error" if sp.status == "error" else "ok",
                    attributes=_struct(sp.attributes),
                    timestamp=ts(sp.start_time),
                    kind=sp.kind,
                    status_message=sp.status_message,
                    resource=_struct(sp.resource),
                )
            )
    return out


def log_entry(inst: Instance, e: Entry) -> pb.LogEntry:
    fields = None
    if e.fields:
        fields = struct_pb2.Struct()
        fields.update(
            {k: v for k, v in e.fields.items() if isinstance(v, str | int | float | bool) or v is None}
        )
    return pb.LogEntry(
        instance_id=inst.id,
        tenant_id=inst.tenant_id,
        level=e.level,
        message=e.line.message,
        fields=fields,
        source=e.line.stream,
        timestamp=ts(e.line.timestamp),
    )


# -- services ---------------------------------------------------------------------------------


class InstanceService(rpc.InstanceServiceServicer):
    def __init__(self, d: InstancesDomain):
        self.d = d

    async def CreateInstance(
        self, request: pb.CreateInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Instance:
        services = specs.services_from_create(
            request.image,
            as_dict(request.resources),
            [as_dict(p) for p in request.ports],
            dict(request.env),
            [as_dict(s) for s in request.services],
        )
        row = await self.d.create(
            principals.current(),
            tenant_id=request.tenant_id,
            name=request.name,
            provider_name=request.provider_name,
            services=services,
            replicas=request.replicas if request.HasField("replicas") else 1,
            labels=dict(request.labels),
            cluster_id=request.cluster_id,
        )
        return instance(row)

    async def ListInstances(
        self, request: pb.ListInstancesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListInstancesResponse:
        page = await self.d.find(
            principals.current(),
            state=request.state,
            label=request.label,
            provider=request.provider,
            tenant_id=request.tenant_id,
            cursor=request.cursor,
            limit=request.limit,
        )
        return pb.ListInstancesResponse(
            items=[instance(r) for r in page.items], next_cursor=page.next_cursor, total=page.total
        )

    async def GetInstance(
        self, request: pb.GetInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Instance:
        return instance(await self.d.get(principals.current(), request.id))

    async def UpdateInstance(
        self, request: pb.UpdateInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Instance:
        row = await self.d.update(
            principals.current(),
            request.id,
            name=request.name if request.HasField("name") else None,
            labels=dict(request.labels),
            services=[as_dict(s) for s in request.services],
        )
        return instance(row)

    async def DeleteInstance(
        self, request: pb.DeleteInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Instance:
        return instance(await self.d.delete(principals.current(), request.id))

    async def StartInstance(
        self, request: pb.StartInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.start(principals.current(), request.id)
        return empty_pb2.Empty()

    async def StopInstance(
        self, request: pb.StopInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.stop(principals.current(), request.id)
        return empty_pb2.Empty()

    async def RestartInstance(
        self, request: pb.RestartInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.restart(principals.current(), request.id)
        return empty_pb2.Empty()

    async def ScaleInstance(
        self, request: pb.ScaleInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.scale(
            principals.current(),
            request.id,
            resources=as_dict(request.resources),
            replicas=request.replicas if request.HasField("replicas") else None,
        )
        return empty_pb2.Empty()

    async def SuspendInstance(
        self, request: pb.SuspendInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.suspend(principals.current(), request.id, request.reason)
        return empty_pb2.Empty()

    async def UnsuspendInstance(
        self, request: pb.UnsuspendInstanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.unsuspend(principals.current(), request.id, request.reason)
        return empty_pb2.Empty()

    async def ListReplicaEndpoints(
        self, request: pb.ListReplicaEndpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListReplicaEndpointsResponse:
        row, reps = await self.d.live_replicas(principals.current(), request.id)
        return pb.ListReplicaEndpointsResponse(
            instance=instance(row),
            items=[
                pb.ReplicaEndpoint(
                    service_name=r.service,
                    release_id=r.release_id,
                    index=r.index,
                    container_port=cport,
                    host_port=hport,
                )
                for r in reps
                for cport, hport in sorted(r.ports.items())
                if hport
            ],
        )


class DeploymentService(rpc.DeploymentServiceServicer):
    def __init__(self, d: DeploymentsDomain):
        self.d = d

    async def Deploy(
        self, request: pb.DeployRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Deployment:
        row = await self.d.deploy(
            principals.current(),
            request.id,
            image=request.image,
            env=dict(request.env),
            strategy=request.strategy,
            notes=request.notes,
            commit_sha=request.commit_sha,
            changes=[{"name": s.name, "image": s.image, "env": dict(s.env)} for s in request.services],
        )
        return deployment(row)

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListDeploymentsResponse:
        page = await self.d.list_deployments(principals.current(), request.id, request.cursor, request.limit)
        return pb.ListDeploymentsResponse(
            items=[deployment(r) for r in page.items], next_cursor=page.next_cursor, total=page.total
        )

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Deployment:
        return deployment(await self.d.get(principals.current(), request.id))

    async def CancelDeployment(
        self, request: pb.CancelDeploymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.cancel(principals.current(), request.id)
        return empty_pb2.Empty()

    async def Rollback(
        self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Deployment:
        return deployment(await self.d.rollback(principals.current(), request.id, request.release_id))

    async def ListReleases(
        self, request: pb.ListReleasesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListReleasesResponse:
        page = await self.d.list_releases(principals.current(), request.id, request.cursor, request.limit)
        return pb.ListReleasesResponse(
            items=[release(r) for r in page.items], next_cursor=page.next_cursor, total=page.total
        )

    async def GetRelease(
        self, request: pb.GetReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Release:
        return release(await self.d.get_release(principals.current(), request.id))


class HealthService(rpc.HealthServiceServicer):
    def __init__(self, d: HealthDomain):
        self.d = d

    async def CreateHealthCheck(
        self, request: pb.CreateHealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HealthCheck:
        row = await self.d.create(
            principals.current(),
            request.id,
            name=request.name,
            type_=request.type,
            target=request.target,
            interval_s=seconds(request, "interval"),
            timeout_s=seconds(request, "timeout"),
            retries=request.retries if request.HasField("retries") else None,
            enabled=request.enabled if request.HasField("enabled") else None,
        )
        return check(row)

    async def GetInstanceHealth(
        self, request: pb.GetInstanceHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.InstanceHealth:
        h = await self.d.instance_health(principals.current(), request.id)
        return pb.InstanceHealth(
            instance_id=h.instance_id,
            status=h.status,
            checks=[
                pb.CheckSummary(
                    check_id=c.id,
                    name=c.name,
                    status=c.status,
                    latency=dur_ms(last.latency_ms) if last else None,
                    last_result=result(last) if last else None,
                )
                for c, last in h.checks
            ],
            last_checked=ts(h.last_checked),
            uptime_percent=h.uptime_percent,
            consecutive_failures=h.consecutive_failures,
        )

    async def ListHealthChecks(
        self, request: pb.ListHealthChecksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListHealthChecksResponse:
        rows = await self.d.list_checks(principals.current(), request.id)
        return pb.ListHealthChecksResponse(items=[check(r) for r in rows], total=len(rows))

    async def RunHealthCheck(
        self, request: pb.RunHealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HealthResult:
        return result(await self.d.run_now(principals.current(), request.id))

    async def DeleteHealthCheck(
        self, request: pb.DeleteHealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.delete(principals.current(), request.id)
        return empty_pb2.Empty()

    async def WatchInstanceHealth(
        self, request: pb.WatchInstanceHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.HealthResult]:
        await self.d.instances.get(principals.current(), request.id)
        await open_stream(context)
        async for row in self.d.watch(principals.current(), request.id):
            yield result(row)


class TelemetryService(rpc.TelemetryServiceServicer):
    def __init__(self, d: TelemetryDomain):
        self.d = d

    async def ListMetrics(
        self, request: pb.ListMetricsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListMetricsResponse:
        step = seconds(request, "step")
        inst, pts = await self.d.metrics(
            principals.current(),
            request.id,
            name=request.name,
            since=when(request, "since"),
            until=when(request, "until"),
            step=timedelta(seconds=step) if step is not None else None,
            limit=request.limit,
        )
        return pb.ListMetricsResponse(items=[metric(inst, x) for x in pts], total=len(pts))

    async def ListTraces(
        self, request: pb.ListTracesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTracesResponse:
        least = seconds(request, "min_duration")
        inst, groups = await self.d.traces(
            principals.current(),
            request.id,
            since=when(request, "since"),
            trace_id=request.trace_id,
            min_duration=timedelta(seconds=least) if least is not None else None,
            limit=request.limit,
        )
        return traces(inst, groups)

    async def GetResources(
        self, request: pb.GetResourcesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ResourceSnapshot:
        p = principals.current()
        since = when(request, "since")
        if since is None:
            return snapshot(await self.d.resources(p, request.id))
        inst = await self.d.instances.get(p, request.id)
        history = await self.d.history(p, request.id, since)
        try:
            out = snapshot(await self.d.resources(p, request.id))
        except CtrlmeshError:
            if not history:
                raise
            out = sample(inst, history[-1])  # not running now: its last sample, with the history
        out.history.extend(sample(inst, x) for x in history)
        return out

    async def ListLogs(
        self, request: pb.ListLogsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListLogsResponse:
        p = principals.current()
        inst = await self.d.instances.get(p, request.id)
        entries = await self.d.logs(
            p, request.id, level=request.level, limit=request.limit, since=when(request, "since")
        )
        return pb.ListLogsResponse(items=[log_entry(inst, e) for e in entries], total=len(entries))

    async def WatchLogs(
        self, request: pb.WatchLogsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.LogEntry]:
        p = principals.current()
        inst = await self.d.instances.get(p, request.id)
        tail = request.tail if request.HasField("tail") else 100
        follow = request.follow if request.HasField("follow") else True
        await open_stream(context)
        async for e in self.d.watch_logs(p, request.id, tail=tail, follow=follow, level=request.level):
            yield log_entry(inst, e)

    async def GetDashboard(
        self, request: pb.GetDashboardRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DashboardData:
        d: Dashboard = await self.d.dashboard(principals.current(), request.id)
        red = d.red
        return pb.DashboardData(
            instance_id=d.instance.id,
            resources=snapshot(d.snapshot) if d.snapshot else None,
            health_status=d.health_status,
            uptime_percent=d.uptime_percent,
            recent_deploys_24h=d.recent_deploys_24h,
            request_rate_per_sec=red.request_rate_per_sec,
            error_rate_per_sec=red.error_rate_per_sec,
            avg_latency=dur_s(red.avg_latency_s) if red.avg_latency_s is not None else None,
            p99_latency=dur_s(red.p99_latency_s) if red.p99_latency_s is not None else None,
            active_alerts=d.active_alerts,
        )


class ProviderService(rpc.ProviderServiceServicer):
    def __init__(self, d: ProvidersDomain):
        self.d = d

    async def ListProviders(
        self, request: pb.ListProvidersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListProvidersResponse:
        items = [
            pb.ProviderStatus(
                name=st.name,
                region=st.region,
                healthy=st.healthy,
                instances=st.instances,
                capabilities=st.capabilities,
                cluster_id=st.cluster_id,
                cluster_name=st.cluster_name,
            )
            for st in await self.d.list(principals.current())
        ]
        return pb.ListProvidersResponse(items=items, total=len(items))


def register(
    server: grpc.aio.Server,
    instances: InstanceService,
    deployments: DeploymentService,
    health: HealthService,
    telemetry: TelemetryService,
    providers: ProviderService,
) -> list[str]:
    rpc.add_InstanceServiceServicer_to_server(instances, server)
    rpc.add_DeploymentServiceServicer_to_server(deployments, server)
    rpc.add_HealthServiceServicer_to_server(health, server)
    rpc.add_TelemetryServiceServicer_to_server(telemetry, server)
    rpc.add_ProviderServiceServicer_to_server(providers, server)
    return [s.full_name for s in pb.DESCRIPTOR.services_by_name.values()]
