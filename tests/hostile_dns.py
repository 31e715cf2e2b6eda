"""A DNS server an attacker controls, on loopback: it stands between the code under test and the
bed's real resolver, and misbehaves on the names it is told to.

Every query it receives goes on to the bed's unbound (``upstream``) and its answer comes back, as
from any resolver, unless a rule for the name (or a name above it) says otherwise:

- ``slow(name, seconds)``: answer, but only after ``seconds``;
- ``hang(name)``: never answer (a resolver that lost the packet, or an attacker dropping it);
- ``cname_chain(name, hops, seconds, txt)``: answer ``name`` with a CNAME to a fresh name, that one
  with a CNAME to the next, ``hops`` times, each answer ``seconds`` late, and the last name with
  the TXT record ``txt``. Each CNAME comes alone (no SOA, no target records), as an authoritative
  server of another zone would give it, so a stub resolver must ask again for each target.

It speaks UDP and TCP (RFC 1035 §4.2.2 framing). Each query is answered in a thread of its own, so
a slow or hanging name never holds up another. ``queries(name)`` counts what was asked.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

# How long the server waits for the bed's resolver before it answers SERVFAIL itself.
UPSTREAM_TIMEOUT = 5.0
# A hanging query is let go (unanswered) after this, so that the threads end with the tests.
HANG_LIMIT = 120.0


@dataclass(frozen=True)
class _Rule:
    kind: str  # "slow", "hang", "chain"
    seconds: float = 0.0
    hops: int = 0
    txt: str = ""


class HostileDNS:
    """The server; ``address`` is ``127.0.0.1:PORT`` for ``[dns] nameservers``."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._rules: dict[dns.name.Name, _Rule] = {}
        self._lock = threading.Lock()
        self._asked: Counter[str] = Counter()
        self._stopping = threading.Event()
        owner = self

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = owner._answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(10)
                try:
                    length = int.from_bytes(_read(conn, 2), "big")
                    reply = owner._answer(_read(conn, length))
                    if reply is not None:
                        conn.sendall(len(reply).to_bytes(2, "big") + reply)
                except (OSError, EOFError):
                    pass

        class UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
            daemon_threads = True

        class TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True

        for _ in range(50):
            udp = UDPServer(("127.0.0.1", 0), UDPHandler)
            port = udp.server_address[1]
            try:
                tcp = TCPServer(("127.0.0.1", port), TCPHandler)
            except OSError:
                udp.server_close()
                continue
            break
        else:  # pragma: no cover - 50 ports taken in a row
            raise OSError("no free UDP+TCP port for the hostile DNS server")
        self._servers: list[Any] = [udp, tcp]
        self.port: int = port
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- rules -----------------------------------------------------------------------------------

    def slow(self, name: str, seconds: float) -> None:
        self._set(name, _Rule("slow", seconds=seconds))

    def hang(self, name: str) -> None:
        self._set(name, _Rule("hang"))

    def cname_chain(self, name: str, hops: int, seconds: float, txt: str) -> None:
        self._set(name, _Rule("chain", seconds=seconds, hops=hops, txt=txt))

    def clear(self, name: str | None = None) -> None:
        """Forget the rule for ``name`` (every rule when None): behave again."""
        with self._lock:
            if name is None:
                self._rules.clear()
            else:
                self._rules.pop(dns.name.from_text(name), None)

    def queries(self, name: str) -> int:
        """How many queries for exactly ``name`` (any type) arrived."""
        with self._lock:
            return self._asked[name.lower().rstrip(".")]

    def close(self) -> None:
        self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _set(self, name: str, rule: _Rule) -> None:
        with self._lock:
            self._rules[dns.name.from_text(name)] = rule

    # -- answering -------------------------------------------------------------------------------

    def _rule_for(self, qname: dns.name.Name) -> tuple[dns.name.Name, _Rule] | None:
        with self._lock:
            self._asked[qname.to_text(omit_final_dot=True).lower()] += 1
            name = qname
            while True:
                rule = self._rules.get(name)
                if rule is not None:
                    return name, rule
                if name == dns.name.root:
                    return None
                name = name.parent()

    def _answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
            question = query.question[0]
        except (dns.exception.DNSException, IndexError):
            return None
        found = self._rule_for(question.name)
        if found is None:
            return self._forward(query)
        origin, rule = found
        if rule.kind == "hang":
            self._stopping.wait(HANG_LIMIT)
            return None
        if rule.kind == "slow":
            if self._stopping.wait(rule.seconds):
                return None
            return self._forward(query)
        return self._chain(query, origin, rule)

    def _chain(self, query: dns.message.Message, origin: dns.name.Name, rule: _Rule) -> bytes:
        """``origin`` → ``h1.chain.<origin>`` → ... → ``hN.chain.<origin>`` (TXT)."""
        qname = query.question[0].name
        if self._stopping.wait(rule.seconds):
            return b""
        hop = 0
        if qname != origin:
            first = qname.labels[0].decode()
            hop = int(first[1:]) if first.startswith("h") and first[1:].isdigit() else rule.hops
        response = dns.message.make_response(query)
        response.flags |= 0x0400  # AA: the zone's own server answers
        if hop < rule.hops:
            target = dns.name.from_text(f"h{hop + 1}.chain", origin)
            response.answer.append(dns.rrset.from_text(qname, 1, "IN", "CNAME", target.to_text()))
        elif query.question[0].rdtype == dns.rdatatype.TXT:
            response.answer.append(dns.rrset.from_text(qname, 1, "IN", "TXT", f'"{rule.txt}"'))
        return response.to_wire()

    def _forward(self, query: dns.message.Message) -> bytes:
        try:
            reply = dns.query.udp(
                query, self._upstream[0], port=self._upstream[1], timeout=UPSTREAM_TIMEOUT
            )
            if reply.flags & 0x0200:  # TC: ask again over TCP
                reply = dns.query.tcp(
                    query, self._upstream[0], port=self._upstream[1], timeout=UPSTREAM_TIMEOUT
                )
        except (OSError, dns.exception.DNSException):
            failed = dns.message.make_response(query)
            failed.set_rcode(dns.rcode.SERVFAIL)
            return failed.to_wire()
        return reply.to_wire()


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def wait_for(condition: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)
