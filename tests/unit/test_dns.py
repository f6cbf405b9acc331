"""relay.dns against a real DNS server on a loopback port (tests/dnsserver.py).

The resolver's three outcomes (an answer, no record, a temporary failure)
must never be confused: these tables pin each one, over UDP and over TCP."""

from __future__ import annotations

import dkim
import dns.resolver
import pytest
import spf

from dnsserver import DNSServer
from relay import dns as relay_dns
from relay import mailauth  # noqa: F401 - installs the pyspf lookup hook, as the relay does


# --- nameserver entries ---------------------------------------------------------

@pytest.mark.parametrize("entry, expected", [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    (" 10.0.0.53 ", ("10.0.0.53", 53)),
    ("::1", ("::1", 53)),
    ("2001:db8::53", ("2001:db8::53", 53)),
    ("[::1]", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("[2001:DB8::53]:53", ("2001:db8::53", 53)),
])
def test_parse_nameserver(entry, expected):
    assert relay_dns.parse_nameserver(entry) == expected


@pytest.mark.parametrize("entry, message", [
    ("", "expected an IP address"),
    ("localhost", "expected an IP address"),
    ("dns.example:53", "expected an IP address"),
    ("127.0.0.1:0", "bad port"),
    ("127.0.0.1:65536", "bad port"),
    ("127.0.0.1:dns", "bad port"),
    ("127.0.0.1:", "bad port"),
    ("[::1", "[v6]:port"),
    ("[::1]5353", "[v6]:port"),
    ("[::1]:", "missing port"),
    ("[localhost]:53", "expected an IP address"),
    ("999.1.1.1", "expected an IP address"),
])
def test_parse_nameserver_rejects(entry, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as info:
        relay_dns.parse_nameserver(entry)
    assert repr(entry) in str(info.value)  # the message names the entry


def test_make_resolver_with_nameservers():
    resolver = relay_dns.make_resolver(["127.0.0.1:5353", "[::1]"])
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [("127.0.0.1", 5353), ("::1", 53)]
    assert resolver.lifetime == relay_dns.DEFAULT_LIFETIME
    assert resolver.timeout <= resolver.lifetime
    assert resolver.search == [] and resolver.use_search_by_default is False
    assert resolver.edns == 0 and resolver.payload == relay_dns.EDNS_PAYLOAD
    assert resolver.cache is not None


def test_make_resolver_without_nameservers_is_the_system_resolver():
    try:
        system = dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration:
        with pytest.raises(ValueError, match="no name servers"):
            relay_dns.make_resolver([])
        return
    resolver = relay_dns.make_resolver([])
    assert [str(ns) for ns in resolver.nameservers] == [str(ns) for ns in system.nameservers]
    assert resolver.lifetime == relay_dns.DEFAULT_LIFETIME


def test_make_resolver_rejects_a_bad_entry():
    with pytest.raises(ValueError, match="'ns1.example'"):
        relay_dns.make_resolver(["127.0.0.1", "ns1.example"])


# --- lookups -------------------------------------------------------------------------

@pytest.mark.parametrize("name, records", [
    ("plain.dns-test.example", [b"hello"]),
    ("split.dns-test.example", [b"v=spf1 -all"]),  # the strings of one record are joined
    ("alias.dns-test.example", [b"hello"]),  # a CNAME is followed
    ("PLAIN.Dns-Test.Example.", [b"hello"]),  # case and the final dot do not matter
    (b"plain.dns-test.example", [b"hello"]),
    ("missing.dns-test.example", []),  # NXDOMAIN
    ("address-only.dns-test.example", []),  # the name exists, without TXT
    ("elsewhere.invalid", []),  # outside every zone: NXDOMAIN too
    ("bad..name.dns-test.example", []),  # not a DNS name: nothing is asked
    ("x" * 64 + ".dns-test.example", []),  # a label too long
    (b"\xff.dns-test.example", []),
])
def test_txt(resolver, name, records):
    assert relay_dns.txt(resolver, name) == records


def test_txt_with_several_records(resolver):
    assert sorted(relay_dns.txt(resolver, "two.dns-test.example")) == [b"first", b"second"]


def test_a_large_answer_comes_over_tcp(resolver, server):
    records = relay_dns.txt(resolver, "big.dns-test.example")
    assert len(records) == 1 and len(records[0]) == 1500
    asked = [transport for name, rdtype, transport in server.queries if name == "big.dns-test.example"]
    assert asked[-2:] == ["udp", "tcp"]  # truncated over UDP, then asked again over TCP


@pytest.mark.parametrize("how", ["timeout", "servfail"])
def test_temporary_failures_raise(resolver, server, how):
    server.fail("plain.dns-test.example", how)
    with pytest.raises(relay_dns.TemporaryDNSError, match="plain.dns-test.example"):
        relay_dns.txt(resolver, "plain.dns-test.example")


def test_a_failure_of_one_type_leaves_the_others(resolver, server):
    server.fail("address-only.dns-test.example", "servfail", rdtype="TXT")
    with pytest.raises(relay_dns.TemporaryDNSError):
        relay_dns.txt(resolver, "address-only.dns-test.example")
    answer = relay_dns.resolve(resolver, "address-only.dns-test.example", "A")
    assert [rdata.address for rdata in answer] == ["127.0.0.1"]


def test_no_reachable_server_is_temporary():
    # The test server's port, before it existed or after it stopped: a closed
    # UDP port answers with ICMP "port unreachable" (dnspython: no server).
    closed = DNSServer().start()
    address = closed.address
    closed.stop()
    resolver = relay_dns.make_resolver([address], lifetime=0.5)
    with pytest.raises(relay_dns.TemporaryDNSError):
        relay_dns.txt(resolver, "plain.dns-test.example")


def test_answers_are_cached(resolver, server):
    assert relay_dns.txt(resolver, "plain.dns-test.example") == [b"hello"]
    server.fail("plain.dns-test.example", "servfail")
    assert relay_dns.txt(resolver, "plain.dns-test.example") == [b"hello"]


# --- the dkimpy adapter ------------------------------------------------------------------

def test_dnsfunc_answers_in_dkimpys_shape(resolver):
    lookup = relay_dns.dnsfunc(resolver)
    assert lookup(b"split.dns-test.example.") == b"v=spf1 -all"
    assert lookup(b"split.dns-test.example.", timeout=5) == b"v=spf1 -all"
    assert lookup(b"two.dns-test.example.") in (b"first", b"second")
    assert lookup(b"missing.dns-test.example.") is None
    assert lookup(b"address-only.dns-test.example.") is None


@pytest.mark.parametrize("how", ["timeout", "servfail"])
def test_dnsfunc_temporary_failure_is_not_a_dkim_error(resolver, server, how):
    # dkimpy turns its own DKIMException subclasses (DnsTimeoutError among
    # them) into a failed signature; a temporary failure must get through.
    server.fail("plain.dns-test.example", how)
    with pytest.raises(relay_dns.TemporaryDNSError) as info:
        relay_dns.dnsfunc(resolver)(b"plain.dns-test.example.")
    assert not isinstance(info.value, dkim.DKIMException)


# --- the process-wide default ---------------------------------------------------------------

@pytest.fixture
def installed(resolver):
    previous = relay_dns.install(resolver)
    yield resolver
    relay_dns.install(previous)


def test_install_makes_it_dnspythons_default(installed, server):
    assert dns.resolver.get_default_resolver() is installed
    answer = dns.resolver.resolve("plain.dns-test.example.", "TXT")
    assert [b"".join(rdata.strings) for rdata in answer] == [b"hello"]
    assert ("plain.dns-test.example", "TXT", "udp") in server.queries


def test_pyspf_on_its_own_goes_through_the_installed_resolver(installed, server):
    # A library calling pyspf directly (not through relay.mailauth) still
    # asks the relay's servers.
    assert spf.check2(i="127.0.0.1", s="bea@reject.example", h="mail.reject.example")[0] == "pass"
    assert spf.check2(i="127.0.0.2", s="bea@reject.example", h="mail.reject.example")[0] == "fail"
    assert ("reject.example", "TXT", "udp") in server.queries


def test_install_returns_the_previous_default(resolver):
    first = relay_dns.make_resolver(["127.0.0.1"])
    original = relay_dns.install(first)
    try:
        assert relay_dns.install(resolver) is first
    finally:
        relay_dns.install(original)
    assert dns.resolver.default_resolver is original
