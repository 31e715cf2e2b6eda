"""STARTTLS receivers on port 25 of loopback addresses, for ``query --check-mx`` (tests only).

Each receiver speaks just enough SMTP for a TLS probe (banner, EHLO, STARTTLS, QUIT; any other
command gets 502) and records every command line it receives, so that a test can prove no
MAIL FROM, RCPT or DATA was ever sent. Its behaviour is one of ``KINDS``:

- ``valid``, ``wrongname``, ``expired``: a certificate from the bed's CA, for the host name, for
  another name, or past its dates; ``selfsigned``: a certificate signed by a CA nobody trusts
  (a one-off trustme CA), for the host name;
- ``notls``: STARTTLS is not offered;
- ``endless-banner``: a banner of continuation lines without end; ``huge-ehlo``: an EHLO reply
  line of megabytes; ``silent-tls``: says 220 to STARTTLS and then never answers the handshake;
  ``nasty-banner``: a valid receiver whose banner carries control characters and a long tail;
  ``intermediate``: a certificate for the host from an intermediate CA of the bed's CA, sent with
  the leaf (``Receiver.issuer_pem``), for DANE-TA; ``starttls-injection``: sends a plain-text
  reply right after its 220 to STARTTLS, before the handshake.

Port 25 needs root, as the bed's port 443 does; each receiver takes its own 127.x.y.z address.
"""

from __future__ import annotations

import datetime
import errno
import random
import socket
import ssl
import threading
from dataclasses import dataclass, field

import trustme

SMTP_PORT = 25
KINDS = (
    "valid",
    "wrongname",
    "expired",
    "selfsigned",
    "notls",
    "endless-banner",
    "huge-ehlo",
    "silent-tls",
    "nasty-banner",
    "intermediate",
    "starttls-injection",
)
# A banner with terminal escapes, a NUL and a long tail, within the line limit of a probe.
NASTY_BANNER = "evil\x1b[2J\x1b]0;owned\x07\x00" + "A" * 900


@dataclass
class Receiver:
    host: str
    kind: str
    address: str
    context: ssl.SSLContext | None
    leaf_der: bytes
    issuer_pem: bytes = b""
    commands: list[str] = field(default_factory=list)
    listener: socket.socket | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, line: str) -> None:
        with self.lock:
            self.commands.append(line)


def _certificate(ca: trustme.CA, host: str, kind: str) -> tuple[trustme.LeafCert, bytes]:
    """The receiver's certificate, and its issuer's (PEM) when that is an intermediate."""
    if kind == "intermediate":
        child = ca.create_child_ca()
        return child.issue_cert(host), child.cert_pem.bytes()
    return _leaf(ca, host, kind), b""


def _leaf(ca: trustme.CA, host: str, kind: str) -> trustme.LeafCert:
    if kind == "wrongname":
        return ca.issue_cert("wrong.example")
    if kind == "expired":
        now = datetime.datetime.now(datetime.UTC)
        return ca.issue_cert(
            host,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
    if kind == "selfsigned":
        return trustme.CA(organization_name="nobody trusts this").issue_cert(host)
    return ca.issue_cert(host)


def _bind() -> tuple[socket.socket, str]:
    last: OSError | None = None
    for _ in range(50):
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((address, SMTP_PORT))
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
            last = exc
            continue
        sock.listen(16)
        return sock, address
    raise OSError(f"no free loopback address for port {SMTP_PORT}: {last}")


class SMTPBed:
    """The receivers of one test session; ``start(host, kind)`` adds one."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ca = ca
        self.receivers: list[Receiver] = []

    def start(self, host: str, kind: str) -> Receiver:
        if kind not in KINDS:
            raise ValueError(f"unknown receiver kind {kind!r}")
        cert, issuer_pem = _certificate(self.ca, host, kind)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        listener, address = _bind()
        leaf = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
        receiver = Receiver(host, kind, address, context, leaf, issuer_pem, listener=listener)
        self.receivers.append(receiver)
        threading.Thread(target=self._accept, args=(receiver,), daemon=True).start()
        return receiver

    def close(self) -> None:
        for receiver in self.receivers:
            receiver.stop.set()
            if receiver.listener is not None:
                receiver.listener.close()

    def _accept(self, receiver: Receiver) -> None:
        assert receiver.listener is not None
        while not receiver.stop.is_set():
            try:
                conn, _ = receiver.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(receiver, conn), daemon=True).start()

    def _serve(self, receiver: Receiver, conn: socket.socket) -> None:
        conn.settimeout(60)
        try:
            _Session(receiver, conn).run()
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            conn.close()


class _Session:
    def __init__(self, receiver: Receiver, conn: socket.socket) -> None:
        self.receiver = receiver
        self.sock: socket.socket = conn
        self.file = conn.makefile("rb")
        self.tls = False

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode("latin-1"))

    def run(self) -> None:
        kind = self.receiver.kind
        if kind == "endless-banner":
            while not self.receiver.stop.is_set():
                self.send("220-still greeting you\r\n" * 100)
            return
        if kind == "nasty-banner":
            self.send(f"220 {NASTY_BANNER}\r\n")
        else:
            self.send(f"220 {self.receiver.host} ESMTP test receiver\r\n")
        while True:
            line = self.file.readline(4096)
            if not line:
                return
            command = line.decode("latin-1").rstrip("\r\n")
            self.receiver.record(command)
            verb = command.split(" ")[0].upper()
            if verb in ("EHLO", "HELO"):
                if kind == "huge-ehlo":
                    self.send("250-" + "x" * (8 * 1024 * 1024) + "\r\n")
                    return
                offer = kind != "notls" and not self.tls
                self.send(f"250-{self.receiver.host}\r\n250-PIPELINING\r\n")
                self.send("250-STARTTLS\r\n250 8BITMIME\r\n" if offer else "250 8BITMIME\r\n")
            elif verb == "STARTTLS" and kind != "notls" and not self.tls:
                if kind == "starttls-injection":
                    self.send("220 go ahead\r\n250 injected before the handshake\r\n")
                    return
                self.send("220 go ahead\r\n")
                if kind == "silent-tls":
                    self.receiver.stop.wait(120)
                    return
                assert self.receiver.context is not None
                self.sock = self.receiver.context.wrap_socket(self.sock, server_side=True)
                self.file = self.sock.makefile("rb")
                self.tls = True
            elif verb == "QUIT":
                self.send("221 bye\r\n")
                return
            else:
                self.send("502 not in this test receiver\r\n")
