"""The `local` compute driver against real PostgreSQL: prepare, a fast start, the tenant role with
its SCRAM verifier, durability settings, stop, crash detection and restart, destroy."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from services.accounts.crypto import scram_verifier
from services.databases.compute.base import ComputeSpec
from services.databases.compute.local import LocalDriver
from services.databases.compute.profiles import PROFILES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture
def driver_and_spec(tmp_path: Path):  # type: ignore[no-untyped-def]
    driver = LocalDriver(tmp_path / "data")
    spec = ComputeSpec(db_id=str(uuid.uuid4()), tenant_id="ten_t", db_name="app", role="tnt_local")
    yield driver, spec
    asyncio.run(driver.destroy(spec))
    shutil.rmtree(driver.root(), ignore_errors=True)  # the per-test root, outside tmp_path as root


async def _login(host: str, port: int, password: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=host, port=port, user="tnt_local", password=password, database="app")


def test_prepare_start_stop_crash_and_destroy(driver_and_spec):  # type: ignore[no-untyped-def]
    """A prepared database starts in well under a second with the tenant's role, keeps data
    across a stop and a SIGKILL, and is gone after destroy."""
    driver, spec = driver_and_spec

    async def scenario() -> None:
        await driver.prepare(spec, scram_verifier("first-pw"))
        data = driver.data_path(spec)
        assert (data / "PG_VERSION").exists()
        if os.geteuid() == 0:
            assert pwd.getpwuid(data.stat().st_uid).pw_name == "ctrlmesh-pg"
        assert data.stat().st_mode & 0o777 == 0o700
        assert not await driver.is_alive(spec), "prepare leaves nothing running"
        hba = [ln for ln in (data / "pg_hba.conf").read_text().splitlines() if ln and not ln.startswith("#")]
        assert [ln.split() for ln in hba] == [["host", "all", "all", "127.0.0.1/32", "scram-sha-256"]]

        t0 = time.monotonic()
        ep = await driver.start(spec, PROFILES["L1"])
        await driver.set_role_verifier(spec, scram_verifier("first-pw"))
        assert time.monotonic() - t0 < 1.0, "a cold start must take well under a second"
        assert ep.host == "127.0.0.1" and ep.port > 0 and ep.worker_id
        conn = await _login(ep.host, ep.port, "first-pw")
        try:
            settings = dict(
                await conn.fetch(
                    "select name, setting from pg_settings where name in "
                    "('fsync','synchronous_commit','full_page_writes','listen_addresses','max_connections')"
                )
            )
            assert settings == {
                "fsync": "on",
                "synchronous_commit": "on",
                "full_page_writes": "on",
                "listen_addresses": "127.0.0.1",
                "max_connections": "100",
            }
            assert await conn.fetchval("select rolsuper from pg_roles where rolname = current_user") is False
            assert (
                await conn.fetchval("select pg_get_userbyid(datdba) from pg_database where datname = 'app'")
                == "tnt_local"
            )
            await conn.execute("create table kv (k int primary key, v text)")
            await conn.execute("insert into kv values (1, 'before stop')")
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await _login(ep.host, ep.port, "wrong")

        await driver.stop(spec)
        assert not await driver.is_alive(spec)

        # A rotated verifier is applied at the next boot.
        ep = await driver.start(spec, PROFILES["L2"])
        await driver.set_role_verifier(spec, scram_verifier("second-pw"))
        assert await driver.is_alive(spec)
        with pytest.raises(asyncpg.InvalidPasswordError):
            await _login(ep.host, ep.port, "first-pw")
        conn = await _login(ep.host, ep.port, "second-pw")
        try:
            assert await conn.fetchval("show max_connections") == "200"
            await conn.execute("insert into kv values (2, 'before crash')")
        finally:
            await conn.close()

        # A crash (the whole process group killed) is noticed and the next start recovers.
        pid = int((driver.data_path(spec) / "postmaster.pid").read_text().split()[0])
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while await driver.is_alive(spec):
            assert time.monotonic() < deadline, "a killed compute must be seen as dead"
            await asyncio.sleep(0.02)
        ep = await driver.start(spec, PROFILES["L1"])
        await driver.set_role_verifier(spec, scram_verifier("second-pw"))
        conn = await _login(ep.host, ep.port, "second-pw")
        try:
            assert [tuple(r) for r in await conn.fetch("select k, v from kv order by k")] == [
                (1, "before stop"),
                (2, "before crash"),
            ]
        finally:
            await conn.close()
        assert await driver.storage_bytes(spec) > 10_000_000

        await driver.destroy(spec)
        assert not data.exists() and not await driver.is_alive(spec)

    asyncio.run(scenario())


def test_start_adopts_a_running_compute(driver_and_spec):  # type: ignore[no-untyped-def]
    """A second driver (a restarted service) adopts the running server instead of starting another."""
    driver, spec = driver_and_spec

    async def scenario() -> None:
        await driver.prepare(spec, scram_verifier("pw"))
        first = await driver.start(spec, PROFILES["L1"])
        again = LocalDriver(driver._data_dir)
        assert await again.is_alive(spec)
        second = await again.start(spec, PROFILES["L1"])
        assert second.port == first.port
        await again.set_role_verifier(spec, scram_verifier("pw"))
        await again.stop(spec)
        assert not await driver.is_alive(spec)

    asyncio.run(scenario())


def test_prepare_succeeds_while_an_orphaned_initdb_still_writes_into_the_cluster(driver_and_spec):  # type: ignore[no-untyped-def]
    """A prepare retried after a kill -9 of the service finds the cluster directory still being
    written by the killed service's orphaned initdb (named by its `-D` path): it is killed, the
    directory emptied and the prepare done (chaos CI failed this with "File exists")."""
    import subprocess

    driver, spec = driver_and_spec
    data = driver.data_path(spec)
    data.mkdir(parents=True, exist_ok=True)
    # What an orphaned initdb does: goes on making files in the directory it was given.
    orphan = subprocess.Popen(
        ["sh", "-c", 'while true; do mkdir -p "$1"; touch "$1/f$$RANDOM" 2>/dev/null; done', "sh", str(data)]
    )
    try:
        time.sleep(0.2)
        asyncio.run(driver.prepare(spec, scram_verifier("pw")))
        assert orphan.wait(timeout=5) == -signal.SIGKILL
    finally:
        orphan.kill()
    assert (driver.data_path(spec) / "PG_VERSION").exists()
