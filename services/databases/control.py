"""The push channel to the PG Gateways: control events (freeze, unfreeze, writer switched,
stopped) fanned out to every open `WatchControl` stream as soon as they are decided.

Events are published after the decision is committed, so a gateway never acts on a change the
catalog does not hold. They are not persisted or replayed: a gateway that (re)connects is sent
HELLO and re-reads its leases, which carry the same state (freeze_new_checkouts, the writer).
A subscriber that cannot keep up (a full queue) is dropped, and reconnects the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import Gauge

log = logging.getLogger("ctrlmesh.databases.control")

SUBSCRIBERS = Gauge("ctrlmesh_databases_control_streams", "PG Gateway control streams open")
QUEUE_SIZE = 1024

HELLO = "HELLO"
FREEZE = "FREEZE"
UNFREEZE = "UNFREEZE"
WRITER_SWITCHED = "WRITER_SWITCHED"
STOPPED = "STOPPED"


@dataclass(frozen=True)
class ControlEvent:
    kind: str
    db_id: str = ""
    tenant_id: str = ""
    name: str = ""
    epoch: int = 0
    writer_host: str = ""
    writer_port: int = 0


class _Dropped(Exception):
    pass


class ControlBus:
    def __init__(self) -> None:
        self._subs: set[asyncio.Queue[ControlEvent | None]] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def publish(self, event: ControlEvent) -> None:
        for q in list(self._subs):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("a control stream fell behind; dropping it (it reconnects)")
                self._subs.discard(q)
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)

    async def subscribe(self) -> AsyncIterator[ControlEvent]:
        q: asyncio.Queue[ControlEvent | None] = asyncio.Queue(QUEUE_SIZE)
        self._subs.add(q)
        SUBSCRIBERS.inc()
        try:
            yield ControlEvent(HELLO)
            while True:
                ev = await q.get()
                if ev is None:
                    return
                yield ev
        finally:
            self._subs.discard(q)
            SUBSCRIBERS.dec()
