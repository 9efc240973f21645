"""Transport for clusters: proto ⇄ domain, nothing else."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from ctrlmesh.clusters.v1 import clusters_pb2 as pb
from ctrlmesh.clusters.v1 import clusters_pb2_grpc as rpc
from google.protobuf import empty_pb2, json_format, struct_pb2

from libs import principal as principals
from libs.errors import PermissionDenied
from libs.protoconv import ts
from services.clusters.apps import TemplatesDomain
from services.clusters.domain import ClustersDomain
from services.clusters.managed import ManagedDatabases, View
from services.clusters.platform import Platform
from services.clusters.repository import ClusterRow, NodeRow
from services.clusters.templates import Template

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def plain(value: Any) -> Any:
    """A Struct's JSON with integral numbers as integers (a Struct stores every number as a
    double, and a schema's `integer` or an int32 field wants 2, not 2.0)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def cluster(c: ClusterRow, nodes: list[NodeRow]) -> pb.Cluster:
    msg = pb.Cluster(
        id=c.id,
        name=c.name,
        type=c.type,
        config=_struct(c.config),
        endpoint=c.endpoint if c.type == "self_managed" else "",
        node_count=len(nodes),
        running_tasks=sum(n.running_tasks for n in nodes),
        created_at=ts(c.created_at),
        updated_at=ts(c.updated_at),
    )
    if c.description is not None:
        msg.description = c.description
    return msg


def node(n: NodeRow) -> pb.Node:
    return pb.Node(
        id=n.id,
        cluster_id=n.cluster_id,
        name=n.name,
        address=n.address,
        status=n.status,
        role=n.role,
        cpu=n.cpu,
        memory_mb=n.memory_mb,
        running_tasks=n.running_tasks,
        labels=n.labels,
        last_heartbeat_at=ts(n.last_heartbeat_at),
        created_at=ts(n.created_at),
        updated_at=ts(n.updated_at),
        availability=n.availability,
        engine_id=n.engine_id,
    )


def managed(v: View, host: str, port: int) -> pb.ManagedDatabase:
    r = v.row
    msg = pb.ManagedDatabase(
        id=r.id,
        cluster_id=r.cluster_id,
        name=r.name,
        engine=r.engine,
        version=r.version,
        status=v.status,
        connection_host=host,
        connection_port=port,
        connection_user=v.user,
        connection_database=r.pg_name,
        db_id=r.db_id,
        tenant_id=r.tenant_id,
        created_at=ts(r.created_at),
        updated_at=ts(r.updated_at),
    )
    if r.app_id:
        msg.app_id = r.app_id
    return msg


def template(t: Template) -> pb.Template:
    return pb.Template(
        id=t.id,
        slug=t.slug,
        name=t.name,
        description=t.description,
        category=t.category,
        version=t.version,
        parameters=_struct(t.parameters),
        spec=_struct(t.spec),
        database=t.database,
    )


class ClusterService(rpc.ClusterServiceServicer):
    def __init__(self, d: ClustersDomain):
        self.d = d

    async def ListClusters(self, request: pb.ListClustersRequest, context: Ctx) -> pb.ListClustersResponse:
        return pb.ListClustersResponse(items=[cluster(c, n) for c, n in await self.d.list_clusters()])

    async def GetCluster(self, request: pb.GetClusterRequest, context: Ctx) -> pb.Cluster:
        return cluster(*await self.d.get_cluster(request.id))

    async def CreateCluster(self, request: pb.CreateClusterRequest, context: Ctx) -> pb.Cluster:
        row = await self.d.create(
            principals.current(),
            name=request.name,
            type_=request.type,
            description=request.description if request.HasField("description") else None,
            endpoint=request.endpoint,
            config=plain(json_format.MessageToDict(request.config)),
        )
        return cluster(*await self.d.get_cluster(row.id))

    async def ResolveCluster(self, request: pb.ResolveClusterRequest, context: Ctx) -> pb.Cluster:
        if not principals.is_system(principals.current()):
            raise PermissionDenied("internal RPC")
        row = await self.d.resolve(request.cluster_id)
        # Internal: the engine endpoint of every type (the instances service places on it).
        return pb.Cluster(
            id=row.id,
            name=row.name,
            type=row.type,
            endpoint=row.endpoint,
            created_at=ts(row.created_at),
            updated_at=ts(row.updated_at),
        )


class NodeService(rpc.NodeServiceServicer):
    def __init__(self, d: ClustersDomain):
        self.d = d

    async def ListNodes(self, request: pb.ListNodesRequest, context: Ctx) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(
            items=[node(n) for n in await self.d.list_nodes(request.cluster_id, request.status)]
        )

    async def GetNode(self, request: pb.GetNodeRequest, context: Ctx) -> pb.Node:
        return node(await self.d.get_node(request.id))

    async def DrainNode(self, request: pb.DrainNodeRequest, context: Ctx) -> pb.Node:
        return node(
            await self.d.set_drain(principals.current(), request.id, drain=True, migrate=request.migrate)
        )

    async def UndrainNode(self, request: pb.UndrainNodeRequest, context: Ctx) -> pb.Node:
        return node(await self.d.set_drain(principals.current(), request.id, drain=False, migrate=False))

    async def CheckPlacement(self, request: pb.CheckPlacementRequest, context: Ctx) -> pb.Placement:
        if not principals.is_system(principals.current()):
            raise PermissionDenied("internal RPC")
        ok, reason, cluster_id = await self.d.placement(request.provider_name, request.cluster_id)
        return pb.Placement(placeable=ok, reason=reason, cluster_id=cluster_id)


class ManagedDatabaseService(rpc.ManagedDatabaseServiceServicer):
    def __init__(self, d: ManagedDatabases):
        self.d = d

    def _out(self, v: View) -> pb.ManagedDatabase:
        return managed(v, self.d.gateway.host, self.d.gateway.port)

    async def CreateManagedDatabase(
        self, request: pb.CreateManagedDatabaseRequest, context: Ctx
    ) -> pb.ManagedDatabase:
        return self._out(
            await self.d.create(
                principals.current(),
                cluster_id=request.cluster_id,
                name=request.name,
                engine=request.engine,
                version=request.version,
                tenant_id=request.tenant_id,
            )
        )

    async def ListManagedDatabases(
        self, request: pb.ListManagedDatabasesRequest, context: Ctx
    ) -> pb.ListManagedDatabasesResponse:
        return pb.ListManagedDatabasesResponse(
            items=[self._out(v) for v in await self.d.list(principals.current())]
        )

    async def GetManagedDatabase(
        self, request: pb.GetManagedDatabaseRequest, context: Ctx
    ) -> pb.ManagedDatabase:
        return self._out(await self.d.get(principals.current(), request.id))

    async def DeleteManagedDatabase(
        self, request: pb.DeleteManagedDatabaseRequest, context: Ctx
    ) -> empty_pb2.Empty:
        await self.d.delete(principals.current(), request.id, force=request.force)
        return empty_pb2.Empty()

    async def BindManagedDatabase(
        self, request: pb.BindManagedDatabaseRequest, context: Ctx
    ) -> pb.ManagedDatabase:
        return self._out(await self.d.bind(principals.current(), request.id, request.app_id))


class TemplateService(rpc.TemplateServiceServicer):
    def __init__(self, d: TemplatesDomain):
        self.d = d

    async def ListTemplates(self, request: pb.ListTemplatesRequest, context: Ctx) -> pb.ListTemplatesResponse:
        return pb.ListTemplatesResponse(items=[template(t) for t in self.d.list(request.category)])

    async def GetTemplate(self, request: pb.GetTemplateRequest, context: Ctx) -> pb.Template:
        return template(self.d.get(request.id))

    async def InstantiateTemplate(
        self, request: pb.InstantiateTemplateRequest, context: Ctx
    ) -> pb.InstantiateTemplateResponse:
        done = await self.d.instantiate(
            principals.current(),
            request.id,
            name=request.name,
            parameters=plain(json_format.MessageToDict(request.parameters)),
            deploy=request.deploy if request.HasField("deploy") else True,
            tenant_id=request.tenant_id,
        )
        out = pb.InstantiateTemplateResponse(app=done.app)
        if done.deployment is not None:
            out.deployment.CopyFrom(done.deployment)
        if done.database is not None:
            out.managed_database.CopyFrom(
                managed(done.database, self.d.managed.gateway.host, self.d.managed.gateway.port)
            )
        return out


class PlatformService(rpc.PlatformServiceServicer):
    def __init__(self, d: Platform):
        self.d = d

    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.PlatformStats:
        s = await self.d.stats(principals.current())
        return pb.PlatformStats(
            apps=s.apps,
            deployments=s.deployments,
            tasks=s.tasks,
            nodes=s.nodes,
            databases=s.databases,
            tenants=s.tenants,
        )

    async def GetPlatformConfig(
        self, request: pb.GetPlatformConfigRequest, context: Ctx
    ) -> pb.PlatformConfig:
        out = pb.PlatformConfig()
        json_format.ParseDict(self.d.config(), out)
        return out


def register(
    server: grpc.aio.Server,
    clusters: ClustersDomain,
    managed_: ManagedDatabases,
    templates: TemplatesDomain,
    platform: Platform,
) -> list[str]:
    rpc.add_ClusterServiceServicer_to_server(ClusterService(clusters), server)
    rpc.add_NodeServiceServicer_to_server(NodeService(clusters), server)
    rpc.add_ManagedDatabaseServiceServicer_to_server(ManagedDatabaseService(managed_), server)
    rpc.add_TemplateServiceServicer_to_server(TemplateService(templates), server)
    rpc.add_PlatformServiceServicer_to_server(PlatformService(platform), server)
    return [s.full_name for s in pb.DESCRIPTOR.services_by_name.values()]
