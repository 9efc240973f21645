"""The accounts domain on a real PostgreSQL: migrations, invariants held under concurrency."""

import asyncio
from pathlib import Path

import pytest

from libs.crypto import Keyring
from libs.db import Database, make_engine, migrate
from libs.errors import AlreadyExists, LimitExceeded
from libs.outbox import Outbox
from libs.principal import Principal, system_principal
from services.accounts import repository as repo
from services.accounts.domain import AccountsDomain
from services.accounts.models import SCHEMA, outbox

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "accounts" / "migrations"


class NoPeers:
    """Accounts' peers, for a domain tested alone: nothing owned anywhere else."""

    async def count(self, tenant_ids):
        return {}

    async def purge(self, tenant_id):
        return True

    async def stats(self):
        return {}


@pytest.fixture
async def domain(database_url):
    engine = make_engine(database_url)
    await migrate(engine, SCHEMA, MIGRATIONS)
    await migrate(engine, SCHEMA, MIGRATIONS)  # a second start finds nothing to do
    db = Database(engine)
    d = AccountsDomain.build(
        db,
        Keyring({"k1": b"k" * 32}, "k1"),
        Outbox(outbox, db),
        NoPeers(),  # type: ignore[arg-type]
        dsn_host="localhost",
        dsn_port=6432,
    )
    yield d
    await db.dispose()


async def _admin(d: AccountsDomain) -> Principal:
    await d.accounts.bootstrap("admin@localhost", "bootstrap-key-for-tests")
    key, acct = await d.keys.authenticate(system_principal("edge"), "bootstrap-key-for-tests")
    return Principal(key_id=key.id, account_id=acct.id, scope="global")


async def test_trial_tenant_cap_holds_under_concurrent_creates(domain):
    """Ten concurrent creates on a trial account: exactly one tenant, nine LimitExceeded."""
    admin = await _admin(domain)
    acct, _, _ = await domain.accounts.create_account(admin, "t@example.com", "T", "", "trial")
    owner = Principal(key_id="key_o", account_id=acct.id, scope="account")
    owner.permissions.can_create_tenant = True
    results = await asyncio.gather(
        *(domain.tenants.create_tenant(owner, f"race_{i}") for i in range(10)), return_exceptions=True
    )
    created = [r for r in results if not isinstance(r, Exception)]
    assert len(created) == 1
    assert all(isinstance(r, LimitExceeded) for r in results if isinstance(r, Exception))


async def test_names_are_unique_under_concurrent_creates(domain):
    """Five concurrent creates of one name: one tenant, the rest Conflict."""
    admin = await _admin(domain)
    results = await asyncio.gather(
        *(domain.tenants.create_tenant(admin, "same_name") for _ in range(5)), return_exceptions=True
    )
    assert sum(1 for r in results if not isinstance(r, Exception)) == 1
    assert all(isinstance(r, AlreadyExists) for r in results if isinstance(r, Exception))


async def test_stored_password_is_encrypted_and_readable_back(domain):
    """The tenant password is stored only encrypted (plus a verifier) and reads back intact."""
    admin = await _admin(domain)
    created = await domain.tenants.create_tenant(admin, "secretive")
    assert created.pg_password not in created.tenant.pg_password_enc
    assert created.tenant.scram_verifier.startswith("SCRAM-SHA-256$4096:")
    again = await domain.tenants.credentials(admin, "secretive")
    assert again.pg_password == created.pg_password


async def test_bootstrap_is_idempotent_and_honours_the_given_key(domain):
    """Restarts never mint a second admin key; a configured key works as exactly that string."""
    admin = await _admin(domain)  # bootstrapped with the configured key
    assert admin.scope == "global"
    keys_before, _ = await domain.keys.list_keys(admin, 1000, 0)
    assert await domain.accounts.bootstrap("admin@localhost", None) is None
    assert await domain.accounts.bootstrap("admin@localhost", "bootstrap-key-for-tests") is None
    keys_after, _ = await domain.keys.list_keys(admin, 1000, 0)
    assert len(keys_after) == len(keys_before)


async def test_every_tenant_read_stays_inside_the_callers_scope(domain):
    """The repository answers a read outside the caller's scope with nothing, exactly like a
    missing row: another account's tenant, another tenant's key, another account's key."""
    admin = await _admin(domain)
    acct_a, _, _ = await domain.accounts.create_account(admin, "a@example.com", "A", "", "standard_payg")
    acct_b, _, _ = await domain.accounts.create_account(admin, "b@example.com", "B", "", "standard_payg")
    a = await domain.tenants.create_tenant(admin, "scope_a", account_id=acct_a.id)
    b = await domain.tenants.create_tenant(admin, "scope_b", account_id=acct_b.id)
    key_b, _ = await domain.keys.create_key(admin, "b-key", "tenant", "scope_b", {}, None, acct_b.id)
    in_a, as_a_tenant = repo.Scope(account_id=acct_a.id), repo.Scope(acct_a.id, a.tenant.id)
    async with domain.tenants.db.session() as s:
        assert (await repo.find_tenant(s, in_a, "scope_a")) is not None
        assert (await repo.find_tenant(s, in_a, "scope_b")) is None
        assert (await repo.find_tenant(s, in_a, b.tenant.id)) is None
        assert (await repo.find_tenant(s, as_a_tenant, b.tenant.id)) is None
        assert (await repo.find_key(s, in_a, key_b.key.id)) is None
        assert (await repo.find_key(s, repo.Scope(acct_b.id, a.tenant.id), key_b.key.id)) is None
        assert (await repo.find_key(s, repo.Scope(account_id=acct_b.id), key_b.key.id)) is not None
        assert await repo.tenant_ids(s, as_a_tenant, acct_b.id) == []
        rows, total = await repo.list_tenants(s, in_a, 100, 0)
        assert [t.name for t in rows] == ["scope_a"] and total == 1


async def test_outbox_session_wakes_watchers_after_commit_only(domain):
    """Outbox.session: a committed publish wakes a local watcher at once (not at the next poll);
    a rolled-back one delivers nothing."""
    box = Outbox(outbox, domain.tenants.db, poll_interval=30.0)  # a poll would be far too late
    after = await box.last_seq()
    seen: asyncio.Queue[dict] = asyncio.Queue()

    async def watch() -> None:
        async for event in box.watch(after, lambda t: t.c.type.like("test.%")):
            await seen.put(event)

    task = asyncio.create_task(watch())
    try:
        await asyncio.sleep(0.3)  # the watcher has replayed and now waits
        with pytest.raises(RuntimeError):
            async with box.session() as s:
                await box.publish(
                    s, "test.rolled_back", resource="t", resource_id="1", data={}, tenant_id="", account_id=""
                )
                raise RuntimeError("abort the transaction")
        async with box.session() as s:
            await box.publish(
                s, "test.committed", resource="t", resource_id="2", data={}, tenant_id="", account_id=""
            )
        event = await asyncio.wait_for(seen.get(), timeout=5)
        assert event["type"] == "test.committed"
        assert seen.empty()
    finally:
        task.cancel()
