"""DNS: the one resolver the relay asks, and the adapters libraries need.

Every DNS lookup the relay makes (SPF, DKIM keys, DMARC policies, and later
MX delivery) goes through a dnspython `Resolver` made here from `[dns]
nameservers`; an empty list means the system's resolver (/etc/resolv.conf).
`install()` also makes it dnspython's process-wide default, so that a library
which looks names up on its own goes through the same servers.

The invariant callers rely on: a lookup ends in exactly one of three ways,
and they are never confused.
- an answer;
- no such record (NXDOMAIN, or the name exists without that type): a final,
  permanent "none";
- a temporary failure (timeout, SERVFAIL or REFUSED from every server, no
  server reachable): `TemporaryDNSError`. It must end as a 4xx reply, never
  as a pass and never as "none".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

# RFC 7208 §4.6.4 leaves 20 s to a whole SPF evaluation; a single lookup
# that takes longer than this is treated as failed (temporarily).
DEFAULT_LIFETIME = 5.0
# Per attempt at one server, so a lost UDP packet is retried within the
# lifetime rather than eating all of it.
DEFAULT_ATTEMPT_TIMEOUT = 2.0
# EDNS0 with the DNS Flag Day 2020 buffer size: a 2048-bit DKIM key fits in
# one UDP answer; anything larger comes back truncated and is asked again
# over TCP (dnspython does that by itself).
EDNS_PAYLOAD = 1232
CACHE_SIZE = 10000


class TemporaryDNSError(Exception):
    """A lookup that could not be answered now (timeout, SERVFAIL, no
    reachable server). Retrying later may succeed: it maps to a 4xx reply."""


def parse_nameserver(entry: str) -> tuple[str, int]:
    """'host', 'host:port', 'v6' or '[v6]:port' → (address, port).

    The host must be an IP address: a name server named by a host name would
    need DNS to be found. Raises ValueError with a message naming the entry
    (config validation prefixes the key)."""
    text = entry.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected \"[v6]:port\", got {entry!r}")
        if rest == ":":
            raise ValueError(f"missing port in {entry!r}")
        port_text = rest[1:] or None
    elif text.count(":") == 1:  # IPv4 (or a name) with a port
        host, _, port_text = text.partition(":")
    else:  # a bare IPv4 or IPv6 address, or garbage
        host, port_text = text, None
    port = 53
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"bad port in {entry!r}")
        port = int(port_text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address (optionally with :port), got {entry!r}") from None
    return str(address), port


def make_resolver(nameservers: Sequence[str] = (), *, lifetime: float = DEFAULT_LIFETIME,
                  cache: bool = True) -> dns.resolver.Resolver:
    """A resolver asking `nameservers` ("host", "host:port", "[v6]:port"),
    or the system's name servers when the list is empty.

    `lifetime` bounds each lookup (all retries included); tests pass a short
    one so that a name that never answers fails quickly. Raises ValueError
    for a malformed entry, or when the list is empty and the system has no
    resolver configuration."""
    if nameservers:
        servers = [dns.nameserver.Do53Nameserver(*parse_nameserver(entry)) for entry in nameservers]
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = servers
    else:
        try:
            resolver = dns.resolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration as exc:
            raise ValueError(f"no name servers given and none in the system configuration: {exc}") from None
    resolver.lifetime = lifetime
    resolver.timeout = min(DEFAULT_ATTEMPT_TIMEOUT, lifetime)
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    # Names are always looked up as given: no search domains, ever.
    resolver.search = []
    resolver.use_search_by_default = False
    if cache:
        resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
    return resolver


def install(resolver: dns.resolver.Resolver) -> dns.resolver.Resolver | None:
    """Make `resolver` dnspython's process-wide default (what
    `dns.resolver.resolve()` and libraries calling it use). Returns the
    previous default so tests can put it back.

    This does not touch `socket.getaddrinfo`: connecting to a host by name
    (the upstream's, for example) still uses the system's resolver, which
    also reads /etc/hosts."""
    previous = dns.resolver.default_resolver
    dns.resolver.default_resolver = resolver
    return previous


def _name(name: str | bytes) -> dns.name.Name | None:
    """The absolute DNS name, or None for text that cannot be one (a name
    taken from a message may be anything; such a name simply has no
    records)."""
    try:
        if isinstance(name, bytes):
            name = name.decode("ascii")
        return dns.name.from_text(name.rstrip(".") + ".")
    except (UnicodeError, dns.exception.DNSException):
        return None


def resolve(resolver: dns.resolver.Resolver, name: str | bytes, rdtype: str,
            lifetime: float | None = None) -> dns.resolver.Answer | None:
    """Look `name` up; None when there is no such record. Raises
    TemporaryDNSError for everything that may answer differently later."""
    qname = _name(name)
    if qname is None:
        return None
    try:
        return resolver.resolve(qname, rdtype, search=False, lifetime=lifetime)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
        return None
    except dns.exception.Timeout as exc:
        raise TemporaryDNSError(f"{qname} {rdtype}: timed out") from exc
    except dns.resolver.NoNameservers as exc:
        # Every server answered SERVFAIL/REFUSED or could not be reached.
        raise TemporaryDNSError(f"{qname} {rdtype}: no server could answer") from exc
    except dns.exception.DNSException as exc:
        raise TemporaryDNSError(f"{qname} {rdtype}: {exc.__class__.__name__}: {exc}") from exc


def txt(resolver: dns.resolver.Resolver, name: str | bytes,
        lifetime: float | None = None) -> list[bytes]:
    """Every TXT record at `name`, each one's strings joined (RFC 7208
    §3.3, RFC 6376 §3.6.2.2); [] when there is none. Raises
    TemporaryDNSError."""
    answer = resolve(resolver, name, "TXT", lifetime)
    if answer is None:
        return []
    return [b"".join(rdata.strings) for rdata in answer]


def dnsfunc(resolver: dns.resolver.Resolver) -> Callable[..., bytes | None]:
    """The TXT lookup in the shape dkimpy (and authheaders) take as
    `dnsfunc`: `f(name: bytes, timeout=5) -> bytes | None`, the first TXT
    record's strings joined, or None when there is none.

    A temporary failure raises TemporaryDNSError, which deliberately is not
    a `dkim.DKIMException`: dkimpy turns its own DnsTimeoutError into a
    plain failed signature, and a timeout must not look like a bad
    signature."""
    def lookup(name: bytes, timeout: float = DEFAULT_LIFETIME) -> bytes | None:
        records = txt(resolver, name, lifetime=min(timeout, resolver.lifetime))
        return records[0] if records else None
    return lookup
