"""/v2/events merges the streams of every service (accounts, databases, instances, network) for
the key's visibility, with one opaque cursor that resumes all of them."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import httpx
import pytest

from libs.events import EVENT_SOURCES, decode_cursor
from tests.fixtures.instances import Tenant, create_body, destroy, make_tenant, wait_state
from tests.fixtures.mesh import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _listen(
    mesh: Mesh, key: str, until: Any, last_event_id: str = "", timeout: float = 40
) -> list[dict[str, Any]]:
    """The events of /v2/events (data with its SSE id) until `until(events)` holds."""
    seen: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    with httpx.stream("GET", f"{mesh.base_url}/v2/events", headers=headers, timeout=timeout) as r:
        assert r.status_code == 200
        sse_id = ""
        for line in r.iter_lines():
            if line.startswith("id: "):
                sse_id = line[4:]
            elif line.startswith("data: "):
                ev = json.loads(line[6:])
                assert ev["id"] == sse_id
                seen.append(ev)
                if until(seen):
                    break
    return seen


def test_v2_events_merges_every_service_and_resumes_all_with_one_cursor(
    imesh: Mesh, docker_host: str
) -> None:
    """A tenant key sees its tenant's accounts, databases and instances events in one stream;
    every id is a cursor with a position in each stream; resuming from the first event replays
    exactly the later ones of all three services; another tenant's events never appear."""
    t: Tenant = make_tenant(imesh, {"max_instances": 2, "max_cpu_millis": 4000, "max_memory_mb": 4096})
    other = make_tenant(imesh)
    c = t.client()
    want = {"api_key.created", "database.created", "instance.created"}
    events: list[dict[str, Any]] = []

    def until(seen: list[dict[str, Any]]) -> bool:
        return want <= {e["type"] for e in seen}

    listener = threading.Thread(target=lambda: events.extend(_listen(imesh, t.key, until)), daemon=True)
    listener.start()
    time.sleep(2.5)  # the merged stream has the head of every service

    admin = imesh.admin()
    k = admin.post("/v2/api-keys", json={"name": "more", "scope": "tenant", "tenant": t.name})
    assert k.status_code == 201, k.text
    db = c.post(f"/v2/tenants/{t.name}/dbs", json={"name": "evdb", "size": "L1"})
    assert db.status_code == 201, db.text
    inst = c.post("/v1/instances", json=create_body())
    assert inst.status_code == 201, inst.text
    admin.post("/v2/api-keys", json={"name": "noise", "scope": "tenant", "tenant": other.name})
    listener.join(60)
    assert not listener.is_alive(), [e["type"] for e in events]

    assert {e["tenant_id"] for e in events} == {t.id}
    sources = {e["type"].split(".")[0]: e for e in events}
    assert {"api_key", "database", "instance"} <= set(sources)
    last = decode_cursor(events[-1]["id"])
    assert set(last) == set(EVENT_SOURCES), last
    # Positions only move forward along the stream.
    cursors = [decode_cursor(e["id"]) for e in events]
    for a, b in itertools.pairwise(cursors):
        assert all(b.get(s, 0) >= a.get(s, 0) for s in a)

    # Resume after the first event: every later one comes again (each stream in its order,
    # the streams interleaved as they arrive), the first does not.
    def key(e: dict[str, Any]) -> tuple[str, int]:
        return e["source"], decode_cursor(e["id"])[e["source"]]

    first, rest = key(events[0]), {key(e) for e in events[1:]}

    def replayed(seen: list[dict[str, Any]]) -> bool:
        return rest <= {key(e) for e in seen}

    replay = [key(e) for e in _listen(imesh, t.key, replayed, last_event_id=events[0]["id"], timeout=20)]
    assert first not in replay and rest <= set(replay)
    for src in {s for s, _ in replay}:
        positions = [p for s, p in replay if s == src]
        assert positions == sorted(positions) and len(set(positions)) == len(positions), (src, positions)

    wait_state(c, inst.json()["id"], "running")
    destroy(c, docker_host, inst.json()["id"])
