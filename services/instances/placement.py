"""The placement check: before a new instance is placed on its engine, the clusters service (the
registry of engines and nodes) says whether a node may take it. With every node of the cluster
drained, the instance waits in `provisioning` with the reason and is placed once a node is
undrained (the reconciler asks again on every pass).

When the clusters service does not answer, placement goes ahead: drain is a scheduling rule, and
a clusters outage must not stop every new instance of the platform.
"""

from __future__ import annotations

import logging

from ctrlmesh.clusters.v1 import clusters_pb2, clusters_pb2_grpc

from libs.errors import CtrlmeshError
from libs.peers import Peer

log = logging.getLogger("ctrlmesh.instances.placement")


class Placement(Peer):
    service = "clusters"

    async def blocked(self, provider_name: str) -> str:
        """Why a new replica on this provider's engine cannot be placed now; "" when it can."""
        try:
            answer = await self.call(
                clusters_pb2_grpc.NodeServiceStub(self.channel).CheckPlacement,
                clusters_pb2.CheckPlacementRequest(provider_name=provider_name),
                deadline=3,
            )
        except CtrlmeshError as err:
            log.warning("placement check unavailable (%s); placing anyway", err)
            return ""
        return "" if answer.placeable else answer.reason
