"""A small authoritative DNS server for tests: real UDP and TCP on loopback.

It serves zones given as zone-file text (dnspython's `dns.zone.from_text`)
on 127.0.0.1, on a port the OS picks, from one background thread. Answers
are built with `dns.message.make_response`: authoritative, CNAMEs followed
within the served zones, NXDOMAIN for a missing name (also outside every
served zone: to the client, these zones are the whole DNS) and an empty
NOERROR (NODATA) for a missing type. A UDP answer larger
than the client's buffer (512 bytes, or its EDNS size) comes back truncated,
so the client asks again over TCP, as against a real server.

Faults, to test temporary errors: `fail(name, "timeout")` makes the server
drop every query for that name (the client times out); `fail(name,
"servfail")` answers SERVFAIL. `queries` records what was asked, so a test
can prove a lookup went through this server.

    with DNSServer.from_files(ZONES.glob("*.zone")) as server:
        resolver = relay.dns.make_resolver([server.address], lifetime=0.5)
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

ZONES = Path(__file__).parent / "zones"  # the zone files the unit tests serve
MAX_CNAME_CHAIN = 8


class DNSServer:
    def __init__(self, zone_texts: Iterable[str] = ()):
        self.zones: dict[dns.name.Name, dns.zone.Zone] = {}
        for text in zone_texts:
            self.add_zone(text)
        self.queries: list[tuple[str, str, str]] = []  # (name, type, "udp"/"tcp")
        self._failures: dict[tuple[dns.name.Name, int | None], str] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.port = 0

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> "DNSServer":
        return cls(Path(path).read_text(encoding="utf-8") for path in sorted(paths))

    def add_zone(self, text: str) -> dns.zone.Zone:
        """Serve one zone; the text must set $ORIGIN and hold SOA and NS."""
        zone = dns.zone.from_text(text, relativize=False)
        self.zones[zone.origin] = zone
        return zone

    # --- faults -----------------------------------------------------------------

    def fail(self, name: str, how: str, rdtype: str | None = None) -> None:
        """Make queries for `name` (of type `rdtype`, or of any type) time
        out (`how="timeout"`: no answer at all) or get SERVFAIL."""
        if how not in ("timeout", "servfail"):
            raise ValueError(how)
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype) if rdtype else None)
        with self._lock:
            self._failures[key] = how

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _failure(self, qname: dns.name.Name, rdtype: int) -> str | None:
        with self._lock:
            return self._failures.get((qname, rdtype)) or self._failures.get((qname, None))

    # --- lifecycle ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """'127.0.0.1:port', the form relay.dns.make_resolver() takes."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> "DNSServer":
        self._udp, self._tcp = _bind_pair()
        self.port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=f"dns-test-server:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._wake_w.send(b"x")
        self._thread.join()
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            sock.close()
        self._thread = None

    def __enter__(self) -> "DNSServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ, "udp")
            selector.register(self._tcp, selectors.EVENT_READ, "tcp")
            selector.register(self._wake_r, selectors.EVENT_READ, "stop")
            while True:
                for key, _ in selector.select():
                    if key.data == "stop":
                        return
                    if key.data == "udp":
                        self._serve_udp()
                    else:
                        self._serve_tcp()

    def _serve_udp(self) -> None:
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        query = _parse(wire)
        if query is None:
            return
        response = self.answer(query, "udp")
        if response is None:
            return
        limit = max(query.payload, 512) if query.edns >= 0 else 512
        try:
            data = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | dns.flags.AA
            data = truncated.to_wire()
        self._udp.sendto(data, peer)

    def _serve_tcp(self) -> None:
        try:
            conn, _ = self._tcp.accept()
        except OSError:
            return
        with conn:
            # One query per connection, as dnspython's client sends; a
            # client that stalls is dropped rather than stalling the server.
            conn.settimeout(5)
            try:
                (length,) = struct.unpack("!H", _recv_exactly(conn, 2))
                query = _parse(_recv_exactly(conn, length))
                if query is None:
                    return
                response = self.answer(query, "tcp")
                if response is None:
                    return
                # No buffer limit over TCP (to_wire() would apply the EDNS one).
                data = response.to_wire(max_size=65535)
                conn.sendall(struct.pack("!H", len(data)) + data)
            except (OSError, EOFError, dns.exception.DNSException):
                return

    # --- answering ----------------------------------------------------------------

    def answer(self, query: dns.message.Message, transport: str = "udp") -> dns.message.Message | None:
        """The response to `query`, or None to stay silent (a timeout)."""
        if len(query.question) != 1:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname, rdtype = question.name, question.rdtype
        with self._lock:
            self.queries.append((qname.to_text(omit_final_dot=True), dns.rdatatype.to_text(rdtype), transport))
        failure = self._failure(qname, rdtype)
        if failure == "timeout":
            return None
        response = dns.message.make_response(query)
        if failure == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        zone = self._zone_for(qname)
        if zone is None:
            # The server stands in for the relay's recursive resolver, and
            # in the tests' world the served zones are the whole DNS.
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        response.flags |= dns.flags.AA
        name = qname
        for _ in range(MAX_CNAME_CHAIN):
            node = zone.get_node(name)
            if node is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                self._add_soa(response, zone)
                return response
            rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if rdataset is not None:
                response.answer.append(_rrset(name, rdataset))
                return response
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None or rdtype == dns.rdatatype.CNAME:
                self._add_soa(response, zone)  # NODATA
                return response
            response.answer.append(_rrset(name, cname))
            name = cname[0].target
            zone = self._zone_for(name)
            if zone is None:
                return response  # the target is elsewhere; the client follows it
        return response

    def _zone_for(self, name: dns.name.Name) -> dns.zone.Zone | None:
        best = None
        for origin, zone in self.zones.items():
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best.origin)):
                best = zone
        return best

    @staticmethod
    def _add_soa(response: dns.message.Message, zone: dns.zone.Zone) -> None:
        soa = zone.get_rdataset(zone.origin, dns.rdatatype.SOA)
        if soa is not None:
            response.authority.append(_rrset(zone.origin, soa))


def _rrset(name: dns.name.Name, rdataset) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, rdataset.rdclass, rdataset.rdtype)
    rrset.update(rdataset)
    return rrset


def _parse(wire: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None


def _recv_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _bind_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same loopback port, chosen by the OS."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise OSError("no free port for both UDP and TCP on 127.0.0.1")
