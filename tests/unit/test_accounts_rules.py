"""Pure rules of the accounts domain: tokens, SCRAM verifiers, slugs."""

import base64

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
