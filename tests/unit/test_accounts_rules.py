"""Pure rules of the accounts domain: tokens, SCRAM verifiers, slugs, billing, internal-RPC guards."""

import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from scramp import ScramClient, ScramMechanism

from services.accounts.crypto import new_token, scram_verifier, token_hash, token_well_formed
from services.accounts.tenants import slugify


def test_tokens_have_prefix_and_checksum():
    """A token is cmk_ + 30 random + 6 checksum characters; a typo fails the checksum."""
    t = new_token()
    assert t.startswith("cmk_") and len(t) == 40 and token_well_formed(t)
    typo = t[:10] + ("a" if t[10] != "a" else "b") + t[11:]
    assert not token_well_formed(typo)
    assert len(token_hash(t)) == 64 and token_hash(t) != token_hash(typo)


def test_scram_verifier_authenticates_the_password_only():
    """The stored verifier (PostgreSQL's format) completes a real SCRAM exchange for the right password."""
    verifier = scram_verifier("pw-1")
    scheme, rest = verifier.split("$", 1)
    iters_salt, keys = rest.split("$")
    iterations, salt = iters_salt.split(":")
    stored, server = keys.split(":")
    assert scheme == "SCRAM-SHA-256" and int(iterations) == 4096
    info = (base64.b64decode(salt), base64.b64decode(stored), base64.b64decode(server), int(iterations))

    def exchange(password: str) -> bool:
        m = ScramMechanism("SCRAM-SHA-256")
        s = m.make_server(lambda _user: info)
        c = ScramClient(["SCRAM-SHA-256"], "u", password)
        s.set_client_first(c.get_client_first())
        c.set_server_first(s.get_server_first())
        try:
            s.set_client_final(c.get_client_final())
        except Exception:
            return False
        c.set_server_final(s.get_server_final())
        return True

    assert exchange("pw-1")
    assert not exchange("pw-2")


def test_slugify_makes_dns_friendly_slugs():
    """Slugs are lowercase letters, digits and single dashes."""
    assert slugify("Acme Corp") == "acme-corp"
    assert slugify("my_tenant$1") == "my-tenant-1"
    assert slugify("___") == "tenant"


def test_one_slug_rule_serves_tenants_and_instances():
    """libs.names.slugify is the single slug rule: each caller only names its fallback, and a
    truncated slug never ends in a dash (it must stay a DNS label)."""
    from libs.names import slugify as shared
    from services.instances.specs import slugify as instance_slug

    assert slugify("Acme Corp") == shared("Acme Corp", "x") == instance_slug("Acme Corp") == "acme-corp"
    assert (slugify("!!"), instance_slug("!!")) == ("tenant", "instance")
    long = "a" * 62 + " b"
    assert shared(long, "x") == "a" * 62


def test_billing_percentages_are_of_the_capped_limits_only():
    """The domain computes the percent of each capped plan limit; uncapped limits are absent."""
    from services.accounts.billing import PLANS, limit_used_percent, merge_usage, period_of

    usage = merge_usage(
        1,
        {
            "ten_a": {"databases": 1, "compute_cu_millihours_L1": 2500, "egress_bytes": 1024**3},
            "ten_b": {"databases": 0, "compute_cu_millihours_L1": 500, "storage_bytes": 7},
        },
    )
    assert usage.databases == 1 and usage.storage_bytes == 7
    assert usage.by_profile == {"L1": 3.0} and usage.compute_cu_hours == 3.0
    assert limit_used_percent(PLANS["trial"], usage) == {
        "tenants": 100.0,
        "databases": 50.0,
        "compute_cu_hours": 30.0,
        "egress_bytes": 20.0,
    }
    assert limit_used_percent(PLANS["standard_payg"], usage) == {}
    start, end = period_of(datetime(2026, 12, 15, 8, 30, tzinfo=UTC))
    assert (start, end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


async def test_internal_rpcs_are_refused_by_the_domain_to_non_system_callers():
    """Authentication, PG-credential lookups and audit records serve other services only: the
    domain refuses any other principal before it reads anything (no database is given)."""
    from libs.errors import PermissionDenied
    from libs.principal import Principal
    from services.accounts.audit import Audit
    from services.accounts.keys import Keys
    from services.accounts.tenants import Tenants

    global_key = Principal(key_id="key_g", account_id="acct_p", scope="global")
    nothing: Any = None
    with pytest.raises(PermissionDenied):
        await Keys(nothing, nothing).authenticate(global_key, "cmk_x")
    with pytest.raises(PermissionDenied):
        await Tenants(nothing, nothing, nothing, nothing, dsn_host="h", dsn_port=1).pg_credentials(
            global_key, "tnt_x"
        )
    with pytest.raises(PermissionDenied):
        await Audit(nothing).record_from(global_key, {})
