"""What a custom domain's hostname may be: the one check, plain Python.

A hostname is taken in its Unicode or ASCII form and kept in its IDNA (`xn--`) ASCII form,
lowercase, without a trailing dot: what DNS, ACME and the ingress all see.
"""

from __future__ import annotations

import ipaddress
import re

import idna

from libs.errors import InvalidArgument

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# The record the tenant publishes: `_ctrlmesh-challenge.<hostname>` TXT <verify_token>.
TXT_PREFIX = "_ctrlmesh-challenge."


def _bad(why: str) -> InvalidArgument:
    return InvalidArgument(f"hostname: {why}", fields={"hostname": why})


def txt_record(hostname: str) -> str:
    return TXT_PREFIX + hostname


def normalize(raw: str, platform_domain: str) -> str:
    """The stored form of `raw`, or InvalidArgument naming the field and what is wrong."""
    name = raw.strip().rstrip(".")
    if not name:
        raise _bad("is empty")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise _bad("is an IP address; a domain needs a DNS name")
    try:
        # UTS #46 mapping lowercases and maps full-width forms; the codec then checks IDNA 2008.
        ascii_name = idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as err:
        raise _bad(f"is not a valid internationalized domain name ({err})") from None
    ascii_name = ascii_name.lower()
    if len(ascii_name) > 253:
        raise _bad("is longer than 253 characters")
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise _bad("must be a fully qualified name (at least two labels, e.g. app.example.com)")
    for label in labels:
        if not _LABEL.match(label):
            raise _bad(f"label {label!r} is not a valid DNS label")
    if labels[-1].isdigit():
        raise _bad("the top-level label cannot be numeric")
    own = platform_domain.strip(".").lower()
    if own and (ascii_name == own or ascii_name.endswith("." + own)):
        raise _bad(f"is under the platform's own domain {own!r}")
    return ascii_name
