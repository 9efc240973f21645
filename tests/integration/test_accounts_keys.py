"""API-key invariants of the accounts domain on a real PostgreSQL: the last global key stays
even when revokes race."""

import asyncio
from pathlib import Path

import psycopg
import pytest

from libs.crypto import Keyring
from libs.db import Database, make_engine, migrate
from libs.errors import InvalidState
from libs.outbox import Outbox
from libs.principal import Principal, system_principal
from services.accounts.domain import AccountsDomain
from services.accounts.keys import PERMISSIONS
from services.accounts.models import SCHEMA, outbox

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "accounts" / "migrations"


class NoPeers:
    """Accounts' peers, for a domain tested alone."""

    async def count(self, tenant_ids):
        return {}


@pytest.fixture
async def domain(database_url):
    engine = make_engine(database_url)
    await migrate(engine, SCHEMA, MIGRATIONS)
    db = Database(engine)
    yield AccountsDomain.build(
        db,
        Keyring({"k1": b"k" * 32}, "k1"),
        Outbox(outbox, db),
        NoPeers(),  # type: ignore[arg-type]
        dsn_host="localhost",
        dsn_port=6432,
    )
    await db.dispose()


async def test_a_revoke_racing_another_waits_for_it_and_then_refuses_the_last_key(domain, database_url):
    """Two global keys; a concurrent transaction revokes one and has not committed yet. The revoke
    of the other must wait for it (not count the uncommitted one as still active) and, once it
    commits, answer InvalidState: the platform keeps a global key."""
    await domain.accounts.bootstrap("admin@localhost", "race-bootstrap-key")
    first, acct = await domain.keys.authenticate(system_principal("edge"), "race-bootstrap-key")
    admin = Principal(key_id=first.id, account_id=acct.id, scope="global")
    second, _ = await domain.keys.create_key(
        admin, "second", "global", "", dict.fromkeys(PERMISSIONS, True), None, ""
    )
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    async with await psycopg.AsyncConnection.connect(dsn) as other:
        await other.execute(
            "UPDATE accounts.api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
            (first.id,),
        )
        revoke = asyncio.create_task(domain.keys.revoke_key(admin, second.key.id))
        await asyncio.sleep(0.5)
        assert not revoke.done(), "the revoke did not wait for the concurrent one"
        await other.commit()
    with pytest.raises(InvalidState):
        await asyncio.wait_for(revoke, timeout=10)
