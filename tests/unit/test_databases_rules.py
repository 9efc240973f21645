"""Unit tests of the databases service's rules: the state machine, the profile table, the event
snapshot and the merged /v2/events ids."""

from __future__ import annotations

import base64
import itertools
from datetime import UTC, datetime

import pytest

from libs.errors import InvalidArgument
from libs.events import decode_cursor, encode_cursor
from services.databases.compute.profiles import COMMON_SETTINGS, PROFILES, SIZES
from services.databases.events import snapshot
from services.databases.repository import Db
from services.databases.state import STATES, TRANSITIONS, Action, State, can_transition, next_action


def test_documented_path_is_allowed_and_shortcuts_are_not():
    """create → stopped → booting → ready → stopping → stopped → deleting is legal; skipping a step is not."""
    path = ["creating", "stopped", "booting", "ready", "stopping", "stopped", "deleting"]
    for src, dst in itertools.pairwise(path):
        assert can_transition(src, dst), (src, dst)
    assert not can_transition("stopped", "ready")
    assert not can_transition("creating", "booting")
    assert not can_transition("ready", "booting")
    assert not TRANSITIONS[State.DELETING], "deleting is final: the row is removed"


def test_every_state_can_be_deleted():
    """A DELETE is accepted from every state but `deleting` itself (force handles running ones)."""
    for s in STATES:
        if s != "deleting":
            assert can_transition(s, "deleting"), s


@pytest.mark.parametrize(
    ("state", "target", "alive", "action"),
    [
        ("creating", 0, None, Action.PREPARE),
        ("booting", 1, None, Action.BOOT),
        ("stopping", 0, None, Action.STOP),
        ("stopping", 1, None, Action.STOP),
        ("deleting", 0, None, Action.DELETE),
        ("ready", 1, True, Action.NONE),
        ("ready", 1, False, Action.LOST),
        ("stopped", 0, False, Action.NONE),
        ("stopped", 0, True, Action.REAP),
        ("stopped", 1, False, Action.BOOT),
        ("error", 0, False, Action.NONE),
        ("error", 0, True, Action.REAP),
    ],
)
def test_reconciler_action_for_each_situation(state, target, alive, action):
    """next_action names the one step that brings actual state toward desired state."""
    assert next_action(state, target, alive) is action


def test_profile_table_is_complete_and_monotonic():
    """L1…L5 exist, CU = the level, and every resource grows with the level."""
    assert SIZES == ("L1", "L2", "L3", "L4", "L5")
    prev = None
    for i, name in enumerate(SIZES, start=1):
        p = PROFILES[name]
        assert p.cu == i and p.vcpu == i
        if prev is not None:
            assert p.memory_mb > prev.memory_mb and p.max_connections > prev.max_connections
        prev = p


def test_every_profile_is_durable():
    """fsync, synchronous_commit and full_page_writes are on whatever the size."""
    assert {COMMON_SETTINGS[k] for k in ("fsync", "synchronous_commit", "full_page_writes")} == {"on"}
    for p in PROFILES.values():
        s = p.settings()
        assert s["fsync"] == "on" and s["synchronous_commit"] == "on"
        assert s["max_connections"] == str(p.max_connections) and s["shared_buffers"] == p.shared_buffers


def _db(**over):  # type: ignore[no-untyped-def]
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    base = dict(
        id="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        tenant_id="ten_x",
        name="app",
        size="L1",
        state="stopped",
        timeline="ab" * 16,
        worker_id="",
        active_connections=0,
        last_used_at=None,
        current_scale=0,
        target_scale=0,
        current_profile="L1",
        target_profile="L1",
        candidate_profile=None,
        candidate_worker_id=None,
        candidate_writer_term=None,
        scale_state="STEADY",
        freeze_new_checkouts=False,
        lease_control_epoch=0,
        autoscale_cooldown_until=None,
        scale_phase_started_at=None,
        scale_phase_deadline_at=None,
        scale_failure_reason=None,
        created_at=t,
        updated_at=t,
        account_id="acct_x",
        pg_user="tnt_x",
        writer_host="127.0.0.1",
        writer_port=5555,
        storage_bytes=1,
        last_error="secret detail",
    )
    base.update(over)
    return Db(**base)


def test_event_snapshot_shows_the_api_object_and_no_internals():
    """Event payloads carry the public fields with RFC 3339 times, never the writer address or errors."""
    snap = snapshot(_db())
    assert snap["db_id"] == "1b4e28ba-2fa1-11d2-883f-0016d3cca427" and snap["state"] == "stopped"
    assert snap["created_at"] == "2026-01-02T03:04:05Z" and snap["last_used_at"] is None
    for internal in ("writer_host", "writer_port", "last_error", "pg_user", "account_id", "storage_bytes"):
        assert internal not in snap


def test_merged_event_ids_round_trip():
    """The merged cursor holds a position per stream and round-trips; the ids of earlier
    releases (`a.d`, a bare accounts number) are still read; junk is 400."""
    cursor = encode_cursor({"accounts": 41, "databases": 7, "instances": 3})
    assert decode_cursor(cursor) == {"accounts": 41, "databases": 7, "instances": 3}
    assert cursor.startswith("c1.") and "41" not in cursor  # opaque, not a format to parse
    assert decode_cursor("41.7") == {"accounts": 41, "databases": 7}
    assert decode_cursor("41") == {"accounts": 41}
    assert decode_cursor("") == {}
    bad_seq = "c1." + base64.urlsafe_b64encode(b"accounts:x").decode()
    for junk in ("x.1", "abc", "c1.!!", bad_seq):
        with pytest.raises(InvalidArgument):
            decode_cursor(junk)
