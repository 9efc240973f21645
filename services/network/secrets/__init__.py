"""Per-instance secrets of the network service: servicer → domain → repository, with the peers
it calls (instances, accounts) and the KEK re-wrap pass."""

from __future__ import annotations

from libs.crypto import Keyring
from libs.db import Database
from libs.outbox import Outbox
from libs.service_main import Runtime
from services.network.secrets.domain import SecretsDomain
from services.network.secrets.peers import Accounts, Instances, Peers


def build(rt: Runtime, keyring: Keyring, outbox: Outbox, db: Database | None = None) -> SecretsDomain:
    peers = Peers(Instances(rt.channels, rt.signer), Accounts(rt.channels, rt.signer))
    return SecretsDomain(db or rt.db, keyring, outbox, peers)
