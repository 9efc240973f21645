"""The gateway's supervisor: restarts with backoff, and gives up on a worker that cannot start."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import pytest

from pggateway import workers


def test_a_worker_that_keeps_crashing_stops_the_supervisor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker that exits at once is restarted with a growing pause, and after five quick
    crashes in a row the supervisor stops with exit code 1 instead of looping forever."""
    monkeypatch.setattr(workers, "RESTART_MIN_SECONDS", 0.02)
    monkeypatch.setattr(workers, "RESTART_MAX_SECONDS", 0.08)
    starts = tmp_path / "starts"
    code = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)"
    sup = workers.Supervisor(1, lambda slot: [sys.executable, "-c", code])
    t0 = time.monotonic()
    before = signal.getsignal(signal.SIGINT)
    assert sup.run() == 1
    assert signal.getsignal(signal.SIGINT) is before
    assert starts.read_text() == "x" * workers.MAX_QUICK_CRASHES
    assert time.monotonic() - t0 < 10


def test_worker_slots_name_distinct_peers_and_pass_their_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker gets its index, the count and the run's tag; a lone worker has no peers; the
    pool size is split so the compute sees about CTRLMESH_PG_POOL_SIZE backends."""
    slot = workers.WorkerSlot(1, 3, "run")
    assert len(set(slot.peers())) == 3 and slot.peers()[1] == slot.peer_address(1)
    assert workers.WorkerSlot(0, 1, "run").peers() == ()
    parser = argparse.ArgumentParser()
    workers.add_worker_arguments(parser)
    assert workers.slot_from_args(parser.parse_args(slot.argv())) == slot
    assert workers.slot_from_args(parser.parse_args([])) is None
    assert [workers.worker_pool_size(20, n) for n in (1, 2, 3, 40)] == [20, 10, 7, 1]
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 4)
    assert workers.worker_count(None) == 4 and workers.worker_count(2) == 2
    with pytest.raises(ValueError):
        workers.worker_count(300)


def test_each_worker_of_the_gateway_keeps_the_prepared_statements_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker of `pggateway.main` reads CTRLMESH_PG_MAX_PREPARED_STATEMENTS from the environment
    it inherits from the supervisor, beside its slot's index, peers and share of the pool."""
    from libs.settings import Settings
    from pggateway.main import config_from

    monkeypatch.setenv("CTRLMESH_PG_MAX_PREPARED_STATEMENTS", "7")
    monkeypatch.setenv("CTRLMESH_PG_POOL_SIZE", "20")
    settings = Settings.load()
    for index in range(2):
        slot = workers.WorkerSlot(index, 2, "run")
        config = config_from(settings, slot)
        assert config.max_prepared_statements == 7
        assert (config.worker_index, config.peers, config.pool_size) == (index, slot.peers(), 10)
    monkeypatch.setenv("CTRLMESH_PG_MAX_PREPARED_STATEMENTS", "0")
    assert config_from(Settings.load()).max_prepared_statements == 0
