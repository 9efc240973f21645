"""Domain rules that need no service: hostname validation and normalisation, the TXT record's
name, the resolver setting, and what a failed lookup tells the tenant."""

from __future__ import annotations

import pytest

from libs.errors import InvalidArgument
from services.network.domains.dns import TxtLookup, parse_resolver
from services.network.domains.hostnames import normalize, txt_record


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("App.Example.COM", "app.example.com"),
        ("app.example.com.", "app.example.com"),
        ("Bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.c-d.example.org", "a-b.c-d.example.org"),
    ],
)
def test_hostnames_are_stored_in_their_lowercase_idna_form(raw: str, stored: str) -> None:
    """Unicode and mixed-case names are kept as lowercase IDNA ASCII without a trailing dot."""
    assert normalize(raw, "localhost") == stored


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("127.0.0.1", "IP address"),
        ("::1", "IP address"),
        ("[2001:db8::1]", "IP address"),
        ("localhost", "fully qualified"),
        ("example", "fully qualified"),
        ("a..example.com", "internationalized"),
        ("-bad.example.com", "internationalized"),
        ("under_score.example.com", "internationalized"),
        ("a.123", "numeric"),
        ("web.acme.localhost", "platform's own domain"),
        ("x" * 64 + ".example.com", "internationalized"),
        ("a." * 127 + "com", "too long"),
    ],
)
def test_invalid_hostnames_name_the_field(raw: str, why: str) -> None:
    """Each refusal is InvalidArgument on `hostname`, saying what is wrong."""
    with pytest.raises(InvalidArgument) as err:
        normalize(raw, "localhost")
    assert "hostname" in err.value.fields and why in err.value.fields["hostname"], err.value.fields


def test_names_under_a_configured_platform_domain_are_refused() -> None:
    """The platform's own domain and its subdomains are not custom domains; siblings are."""
    for raw in ("apps.example.net", "x.apps.example.net"):
        with pytest.raises(InvalidArgument):
            normalize(raw, "apps.example.net")
    assert normalize("myapps.example.net", "apps.example.net") == "myapps.example.net"


def test_txt_record_name() -> None:
    """The record to create is `_ctrlmesh-challenge.<hostname>`."""
    assert txt_record("app.example.com") == "_ctrlmesh-challenge.app.example.com"


def test_resolver_setting() -> None:
    """CTRLMESH_DNS_RESOLVER is host[:port] (IPv6 bracketed); empty means the system's."""
    assert parse_resolver("") is None
    assert parse_resolver("10.0.0.2") == ("10.0.0.2", 53)
    assert parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_resolver("[::1]:5300") == ("::1", 5300)
    assert parse_resolver("::1") == ("::1", 53)


def test_lookup_descriptions() -> None:
    """A failed lookup says whether the name is missing, has no TXT, or holds other values."""
    assert "does not exist" in TxtLookup("n", (), "nxdomain").describe()
    assert "no TXT record" in TxtLookup("n", (), "no_answer").describe()
    assert "'other'" in TxtLookup("n", ("other",)).describe()
    assert TxtLookup("n", ("a", "tok")).holds("tok")
