"""One process of a service running `libs.reconcile` drives against a real PostgreSQL, for the
tests that kill it mid-action.

    python -m tests.clients.reconcile_worker DATABASE_URL OWNER KEY [--step-sleep S]

Drives KEY: each step records one more of three stages in `work` (the row is the desired
state and the progress), sleeping S seconds inside the step after recording its start, so a
test can SIGKILL the process mid-action. Prints `claimed`, `stage N`, `done` or `busy`.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import timedelta

from sqlalchemy import text

from libs.db import Database, make_engine
from libs.reconcile import Claims, KeyedRunner
from tests.integration.test_reconcile import CLAIMS, STAGES


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("owner")
    ap.add_argument("key")
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--ttl", type=float, default=1.0)
    args = ap.parse_args()
    db = Database(make_engine(args.url, pool_size=2))
    claims = Claims(db, CLAIMS, args.owner, ttl=timedelta(seconds=args.ttl))
    ran = False

    async def step(key: str) -> bool:
        nonlocal ran
        if not ran:
            ran = True
            print("claimed", flush=True)
        async with db.session() as s:
            done = (await s.execute(text("SELECT done FROM work WHERE key = :k"), {"k": key})).scalar_one()
        if done >= STAGES:
            return False
        print(f"stage {done + 1}", flush=True)
        await asyncio.sleep(args.step_sleep)  # the action in flight: a kill lands here
        async with db.session() as s:
            await s.execute(
                text("UPDATE work SET done = done + 1, log = log || :o WHERE key = :k AND done = :d"),
                {"k": key, "d": done, "o": [f"{args.owner}:{done + 1}"]},
            )
        return True

    runner: KeyedRunner[str] = KeyedRunner("test drive", step, claims=claims)
    await runner.run(args.key)
    print("done" if ran else "busy", flush=True)
    await db.dispose()


if __name__ == "__main__":
    asyncio.run(main())
