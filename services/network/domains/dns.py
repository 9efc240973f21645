"""The DNS driver of domain verification: one TXT lookup through dnspython.

`CTRLMESH_DNS_RESOLVER` (`host[:port]`) names the server asked; unset, the system's resolvers
(/etc/resolv.conf) are. The answer says what was found, so a failed verification can tell the
tenant whether the record is missing, holds another value, or the lookup itself failed.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

LOOKUP_TIMEOUT = 5.0


@dataclass(frozen=True)
class TxtLookup:
    """The values of one TXT lookup, or why there are none."""

    name: str
    values: tuple[str, ...]
    # "" when the name answered; else nxdomain | no_answer | timeout | error.
    problem: str = ""
    detail: str = ""

    def holds(self, token: str) -> bool:
        return token in self.values

    def describe(self) -> str:
        """What was found, in one line for the tenant."""
        if self.values:
            return f"{self.name} TXT holds {', '.join(repr(v) for v in self.values)}"
        return {
            "nxdomain": f"{self.name} does not exist",
            "no_answer": f"{self.name} exists but has no TXT record",
            "timeout": f"the DNS lookup of {self.name} timed out",
        }.get(self.problem, f"the DNS lookup of {self.name} failed: {self.detail}")


def parse_resolver(spec: str) -> tuple[str, int] | None:
    """`host[:port]` (IPv6 as `[::1]:53`) → (host, port); None for the system's resolvers."""
    spec = spec.strip()
    if not spec:
        return None
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return host, int(rest.lstrip(":") or 53)
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return host, int(port)
    return spec, 53


class TxtResolver:
    def __init__(self, server: str = "", timeout: float = LOOKUP_TIMEOUT):
        target = parse_resolver(server)
        if target is None:
            self._resolver = dns.asyncresolver.Resolver()
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [target[0]]
            self._resolver.port = target[1]
        self._resolver.lifetime = timeout
        # Verification must see a record the moment it is written, not a cached miss.
        self._resolver.cache = None

    async def txt(self, name: str) -> TxtLookup:
        try:
            answer = await self._resolver.resolve(name, dns.rdatatype.TXT, search=False)
        except dns.resolver.NXDOMAIN:
            return TxtLookup(name, (), "nxdomain")
        except dns.resolver.NoAnswer:
            return TxtLookup(name, (), "no_answer")
        except dns.exception.Timeout:
            return TxtLookup(name, (), "timeout")
        except dns.exception.DNSException as err:
            return TxtLookup(name, (), "error", type(err).__name__)
        values = tuple(b"".join(r.strings).decode("utf-8", "replace") for r in answer)
        return TxtLookup(name, values)
