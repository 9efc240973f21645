"""The gateway's end of the push channel: follows the databases service's WatchControl stream
and hands each event to the routes of its database (`Route.apply_control`), so a freeze holds
new checkouts within milliseconds of being decided instead of at the next lease renewal.

The stream is re-opened after any failure (every RECONNECT_SECONDS); each (re)open starts with
HELLO, on which every route renews at once, since events sent while the stream was down are not
replayed. While it is down the lease renewals carry the same state (the fallback).
"""

from __future__ import annotations

import asyncio
import logging

from pggateway.controlplane import ControlPlane, ControlPlaneError
from pggateway.metrics import GatewayMetrics
from pggateway.route import Router

log = logging.getLogger("ctrlmesh.pggateway.control")

RECONNECT_SECONDS = 0.5


class ControlFollower:
    def __init__(self, control_plane: ControlPlane, router: Router, holder_id: str, metrics: GatewayMetrics):
        self._cp = control_plane
        self._router = router
        self._holder = holder_id
        self._metrics = metrics

    async def run(self) -> None:
        while True:
            try:
                async for ev in self._cp.watch_control(self._holder):
                    if ev.kind == "HELLO":
                        self._metrics.control_stream_up.set(1)
                        for route in self._router.routes():
                            route.resync()
                        continue
                    for route in self._router.routes():
                        if route.tenant_id == ev.tenant_id and route.database == ev.name:
                            route.apply_control(ev)
            except asyncio.CancelledError:
                raise
            except ControlPlaneError as err:
                log.info("control stream closed (%s); reconnecting", err)
            except Exception:
                log.warning("control stream failed; reconnecting", exc_info=True)
            self._metrics.control_stream_up.set(0)
            await asyncio.sleep(RECONNECT_SECONDS)
