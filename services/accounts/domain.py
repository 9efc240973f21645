"""The accounts domain: one object per job, built once and handed to the servicer.

Plain Python over the repository (services/accounts/repository.py); no gRPC, no SQL here.
Each job lives in its own module: `account` (the platform account, customer accounts, profile),
`keys` (API keys), `tenants` (tenants, credentials, admin), `billing` (plans, usage), `audit`,
`stats`. Authorization is part of each job, never of the servicer.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.crypto import Keyring
from libs.db import Database
from libs.outbox import Outbox
from services.accounts.account import Accounts
from services.accounts.audit import Audit
from services.accounts.billing import Billing
from services.accounts.keys import Keys
from services.accounts.peers import Peers
from services.accounts.stats import Stats
from services.accounts.tenants import Tenants


@dataclass(frozen=True)
class AccountsDomain:
    accounts: Accounts
    keys: Keys
    tenants: Tenants
    billing: Billing
    audit: Audit
    stats: Stats
    # The event stream reads accounts' outbox and the other services' streams (events.py).
    outbox: Outbox
    peers: Peers

    @classmethod
    def build(
        cls, db: Database, keyring: Keyring, outbox: Outbox, peers: Peers, *, dsn_host: str, dsn_port: int
    ) -> AccountsDomain:
        return cls(
            accounts=Accounts(db, outbox),
            keys=Keys(db, outbox),
            tenants=Tenants(db, keyring, outbox, peers, dsn_host=dsn_host, dsn_port=dsn_port),
            billing=Billing(db, peers),
            audit=Audit(db),
            stats=Stats(db, peers),
            outbox=outbox,
            peers=peers,
        )
