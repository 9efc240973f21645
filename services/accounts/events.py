"""/v2/events: the streams of every service in `libs.events.EVENT_SOURCES`, merged for the
caller's visibility (an account key sees its account's events, a tenant key its tenant's, a
global key everything). Accounts' own outbox is read locally; every other service's through its
EventStreamService. The ids are the merged cursor of libs/events.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ctrlmesh.common.v1 import internal_pb2

from libs import events as streams
from libs.principal import Principal
from services.accounts.domain import AccountsDomain


def _scope(p: Principal) -> dict[str, str]:
    if p.scope == "account":
        return {"account_id": p.account_id}
    if p.scope == "tenant":
        return {"tenant_id": p.tenant_id}
    return {}


async def watch(
    domain: AccountsDomain, p: Principal, last_event_id: str, types: list[str]
) -> AsyncIterator[internal_pb2.Event]:
    """The merged stream for principal `p`, resumed from `last_event_id`."""
    positions = streams.decode_cursor(last_event_id)
    scope = _scope(p)
    where = streams.outbox_filter(types, **scope)

    def local(after: int | None) -> AsyncIterator[internal_pb2.Event]:
        return streams.outbox_stream(domain.outbox, "accounts", after, where)

    sources: dict[str, streams.Source] = {"accounts": local}
    for name in streams.EVENT_SOURCES:
        if name != "accounts":
            sources[name] = domain.peers.event_source(name, types, **scope)
    async for event in streams.merge(sources, positions):
        yield event
