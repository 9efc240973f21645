"""The instances service's client of the clusters service, the one registry of engines.

- **Where** an instance runs: `resolve` gives the cluster an instance create names (or `main`,
  every provider's default) with its engine endpoint; `clusters` lists them all for
  /v1/admin/providers and teaches the provider registry their endpoints.
- **Whether** a new replica may be placed now: `blocked`. With every node of the cluster drained
  a new instance waits in `provisioning`, and a scale-up's extra replicas wait while the running
  ones keep running, each with the reason, until a node is undrained (the reconciler asks again
  on every pass).

When the clusters service does not answer, placement goes ahead: drain is a scheduling rule, and
a clusters outage must not stop every new instance of the platform.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ctrlmesh.clusters.v1 import clusters_pb2, clusters_pb2_grpc

from libs.errors import CtrlmeshError
from libs.peers import Peer

log = logging.getLogger("ctrlmesh.instances.placement")

# How every reason the clusters service gives for holding a replica begins (its `placement`).
WAITING = "waiting for a node"


@dataclass(frozen=True)
class ClusterRef:
    id: str
    name: str
    # "local" (one engine host) or "self_managed" (a Docker Swarm, its manager's engine).
    type: str
    endpoint: str


def _ref(c: clusters_pb2.Cluster) -> ClusterRef:
    return ClusterRef(c.id, c.name, c.type, c.endpoint)


class Placement(Peer):
    service = "clusters"

    def _clusters(self) -> clusters_pb2_grpc.ClusterServiceStub:
        return clusters_pb2_grpc.ClusterServiceStub(self.channel)

    async def resolve(self, cluster_id: str) -> ClusterRef:
        """The named cluster with its endpoint, or `main` for ""; NotFound for an unknown id,
        Unavailable when the clusters service does not answer."""
        got = await self.call(
            self._clusters().ResolveCluster,
            clusters_pb2.ResolveClusterRequest(cluster_id=cluster_id),
            deadline=3,
            kind="cluster",
            ident=cluster_id,
        )
        return _ref(got)

    async def clusters(self, known: set[str]) -> list[ClusterRef]:
        """Every registered cluster; the endpoint is asked for the ones not in `known` (the
        public listing does not carry a local engine's)."""
        listed = await self.call(
            self._clusters().ListClusters, clusters_pb2.ListClustersRequest(), deadline=10
        )
        out = []
        for c in listed.items:
            out.append(_ref(c) if c.id in known else await self.resolve(c.id))
        return out

    async def blocked(self, provider_name: str, cluster_id: str = "") -> str:
        """Why a new replica on this cluster (or, without one, this provider's engine) cannot
        be placed now; "" when it can."""
        try:
            answer = await self.call(
                clusters_pb2_grpc.NodeServiceStub(self.channel).CheckPlacement,
                clusters_pb2.CheckPlacementRequest(provider_name=provider_name, cluster_id=cluster_id),
                deadline=3,
            )
        except CtrlmeshError as err:
            log.warning("placement check unavailable (%s); placing anyway", err)
            return ""
        return "" if answer.placeable else answer.reason
