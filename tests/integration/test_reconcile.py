"""libs.reconcile against a real PostgreSQL: single flight per key in one process, claims that
keep two processes from driving the same resource, and a drive resumed by the next owner after
its process was killed mid-action."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import MetaData, text

from libs.db import Database, make_engine
from libs.reconcile import Claims, KeyedRunner, claims_table, every

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
CLAIMS = claims_table(MetaData(schema="public"))
STAGES = 3


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    d = Database(make_engine(database_url, pool_size=4))
    async with d.engine.begin() as conn:
        await conn.run_sync(CLAIMS.metadata.create_all)
        await conn.execute(text("DELETE FROM public.reconcile_claims"))
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS work (key text PRIMARY KEY, done int NOT NULL, log text[] NOT NULL)"
            )
        )
        await conn.execute(text("TRUNCATE work"))
    yield d
    await d.dispose()


async def test_one_drive_per_key_and_a_kick_during_a_drive_runs_it_again() -> None:
    """Kicks of a busy key never start a second drive; one that arrives mid-drive makes the
    drive step once more after it ends, so the later decision is not missed."""
    running = 0
    most = 0
    steps: list[str] = []
    gate = asyncio.Event()

    async def step(key: str) -> bool:
        nonlocal running, most
        running += 1
        most = max(most, running)
        steps.append(key)
        if len(steps) == 1:
            await gate.wait()
        running -= 1
        return False

    runner: KeyedRunner[str] = KeyedRunner("unit", step)
    first = runner.kick("a")
    await asyncio.sleep(0.01)
    assert runner.kick("a") is first and runner.busy("a")
    runner.kick("a")
    gate.set()
    await first
    assert steps == ["a", "a"] and most == 1 and not runner.busy("a")


async def test_a_failing_step_is_counted_and_the_next_kick_drives_again() -> None:
    """A step that raises ends the drive (logged and counted); the key can be driven again."""
    calls = 0

    async def step(key: str) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("engine away")
        return False

    runner: KeyedRunner[str] = KeyedRunner("failing unit", step)
    await runner.run("k")
    await runner.run("k")
    assert calls == 2


async def test_every_survives_a_failing_pass_and_stops_on_cancel() -> None:
    """A periodic pass that raises does not end the loop; cancelling it ends it cleanly."""
    passes = 0
    fourth = asyncio.Event()

    async def tick() -> None:
        nonlocal passes
        passes += 1
        if passes == 2:
            raise RuntimeError("one bad pass")
        if passes == 4:
            fourth.set()

    task = asyncio.create_task(every("unit loop", 0.01, tick, first=0))
    await asyncio.wait_for(fourth.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert passes >= 4


async def test_a_claim_keeps_a_second_owner_out_until_released_or_expired(db: Database) -> None:
    """Only one owner holds a key; the holder can renew it; a released or expired claim passes
    to the next owner, and the old owner's renew then says it lost it."""
    a = Claims(db, CLAIMS, "a", ttl=timedelta(seconds=0.5))
    b = Claims(db, CLAIMS, "b", ttl=timedelta(seconds=0.5))
    assert await a.acquire("r1")
    assert not await b.acquire("r1")
    assert await a.acquire("r1") and await a.renew("r1")
    await a.release("r1")
    assert await b.acquire("r1")
    await asyncio.sleep(0.7)
    assert await a.acquire("r1")
    assert not await b.renew("r1")


async def test_two_runners_with_claims_never_drive_a_key_at_once(db: Database) -> None:
    """Two runners (two owners, as two processes would be) kicked on the same keys at once:
    every key is driven, and never by both at the same time."""
    active: dict[str, str] = {}
    overlaps: list[str] = []
    driven: list[tuple[str, str]] = []

    def make(owner: str) -> KeyedRunner[str]:
        async def step(key: str) -> bool:
            if key in active:
                overlaps.append(key)
            active[key] = owner
            await asyncio.sleep(0.05)
            del active[key]
            driven.append((owner, key))
            return False

        return KeyedRunner(f"runner {owner}", step, claims=Claims(db, CLAIMS, owner))

    r1, r2 = make("p1"), make("p2")
    keys = [f"k{i}" for i in range(10)]
    await asyncio.gather(*(r.run(k) for k in keys for r in (r1, r2)))
    assert overlaps == []
    assert {k for _, k in driven} == set(keys)
    async with db.session() as s:
        left = (await s.execute(text("SELECT count(*) FROM public.reconcile_claims"))).scalar_one()
    assert left == 0


async def test_a_drive_killed_mid_action_is_resumed_by_the_next_owner(
    db: Database, database_url: str
) -> None:
    """A process SIGKILLed in the middle of an action leaves its claim to expire; meanwhile no
    other process may drive the key; then the next owner takes it over and finishes the action
    from the row (no stage done twice, none skipped)."""
    async with db.session() as s:
        await s.execute(text("INSERT INTO work VALUES ('job', 0, '{}')"))

    def worker(owner: str, sleep: float, ttl: float = 8.0) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.clients.reconcile_worker",
                database_url,
                owner,
                "job",
                "--step-sleep",
                str(sleep),
                "--ttl",
                str(ttl),
            ],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}"),
            stdout=subprocess.PIPE,
            text=True,
        )

    first = worker("first", 30)
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "claimed"
    assert first.stdout.readline().strip() == "stage 1"
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)

    # Its claim is still live: a second process may not drive the job yet.
    early = worker("early", 0)
    out, _ = early.communicate(timeout=20)
    assert out.strip().splitlines() == ["busy"]

    # The dead owner's claim expires (no renewals come from a killed process).
    deadline = time.monotonic() + 15
    while True:
        async with db.session() as s:
            live = (
                await s.execute(text("SELECT count(*) FROM public.reconcile_claims WHERE expires_at > now()"))
            ).scalar_one()
        if not live:
            break
        assert time.monotonic() < deadline, "the dead owner's claim never expired"
        await asyncio.sleep(0.2)
    second = worker("second", 0)
    out, _ = second.communicate(timeout=20)
    assert second.returncode == 0, out
    assert out.strip().splitlines() == ["claimed", "stage 1", "stage 2", "stage 3", "done"]
    async with db.session() as s:
        done, log = (await s.execute(text("SELECT done, log FROM work WHERE key = 'job'"))).one()
    assert done == STAGES
    assert log == ["second:1", "second:2", "second:3"]
