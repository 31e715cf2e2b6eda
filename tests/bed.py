"""A real DNS and HTTPS test bed on loopback: the servers MTA-STS discovery talks to, no mocks.

- knot (Debian package ``knot``) serves the zone ``mtasts.test`` authoritatively and accepts
  dynamic updates (RFC 2136) from loopback, so a test changes records at run time
  (``Bed.dns_set``).
- unbound (Debian package ``unbound``) is the recursive resolver the code under test asks; a stub
  zone sends ``mtasts.test`` to knot. It caches nothing, so an update is seen at once.
- A Python HTTPS server on port 443 of a loopback address serves the policy hosts
  ``mta-sts.<domain>``. Per host it can answer normally or misbehave (status, redirect, media type,
  delay, slow drip, hang, oversized body) and present a valid, expired, wrong-name or untrusted
  certificate from a throwaway CA made in this run (trustme).
- A "dead" nameserver: a bound UDP and TCP port that never answers.

SCENARIOS is the one table of the standard test domains ``<label>.mtasts.test``: their DNS
records and how their policy host behaves. ``Bed.start`` publishes all of them; tests read their
expectations from the same table.

The servers run as children of the test process with their own configuration, logs and state in a
temporary directory; nothing of the system's configuration is used or changed. Later issues add a
DNSSEC-signed zone (knot signs it on the fly) and a validating unbound with its trust anchor:
``_knot_config`` and ``_unbound_config`` take the zone list and trust anchors for that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import os
import random
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.update
import dns.zone
import trustme

ZONE = "mtasts.test"
RECORD_TTL = 1
POLICY_PATH = "/.well-known/mta-sts.txt"

KNOTD = "/usr/sbin/knotd"
UNBOUND = "/usr/sbin/unbound"

# How long a server may take to come up, and how long to wait for it to stop before killing it.
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
# Socket timeout of the HTTPS server's connections (TLS handshake, reading the request). A "hang"
# response waits for the bed to stop (or HANG_LIMIT), never for the client.
HTTPS_IO_TIMEOUT = 10.0
HANG_LIMIT = 600.0

CertKind = Literal["valid", "expired", "wrongname", "untrusted"]
CERT_KINDS: tuple[CertKind, ...] = ("valid", "expired", "wrongname", "untrusted")
WRONG_NAME = "wrong.example"


class BedError(Exception):
    """The test bed could not be started or changed; the message says what to fix."""


# --------------------------------------------------------------------------------------------------
# The scenario table.


@dataclass(frozen=True)
class Response:
    """How a policy host answers every GET (any path).

    ``content_type`` None sends no Content-Type header. ``drip`` = (bytes per chunk, seconds between
    chunks). ``hang`` reads the request and never answers. ``headers`` are added last and override
    the defaults (Content-Length included).
    """

    body: bytes = b""
    status: int = 200
    content_type: str | None = "text/plain"
    delay: float = 0.0
    drip: tuple[int, float] | None = None
    hang: bool = False
    cert: CertKind = "valid"
    headers: Mapping[str, str] = field(default_factory=dict)


def policy_text(
    mode: str, mx: Sequence[str] = (), max_age: int = 86400, *, newline: str = "\n"
) -> bytes:
    """An RFC 8461 §3.2 policy body."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return (newline.join(lines) + newline).encode("ascii")


@dataclass(frozen=True)
class Scenario:
    """A test domain: the TXT records at ``_mta-sts.<domain>``, extra records, its policy host.

    ``records`` are (name relative to the domain, "@" for the domain itself, type, value): TXT
    values are raw text, others zone-file rdata with names relative to the zone. ``response`` None
    leaves the policy host without an address record. ``record_id``, ``mode``, ``mx`` and
    ``max_age`` are what a test expects discovery to find ("", 0 or empty when it finds nothing).
    """

    txt: tuple[str, ...] = ()
    response: Response | None = None
    records: tuple[tuple[str, str, str], ...] = ()
    record_id: str = ""
    mode: str = ""
    mx: tuple[str, ...] = ()
    max_age: int = 0


def _policy_scenario(
    label: str,
    mode: str = "enforce",
    *,
    other_txt: tuple[str, ...] = (),
    body: bytes | None = None,
    **response: Any,
) -> Scenario:
    """A domain with one valid record and a policy host serving a valid policy, maybe misbehaving
    as ``response`` (keyword arguments of Response) says."""
    record_id = f"{label}20240101"
    mx = (f"mail.{label}.{ZONE}", "*.example.net")
    policy = policy_text(mode, mx)
    return Scenario(
        txt=(*other_txt, f"v=STSv1; id={record_id};"),
        response=Response(body=policy if body is None else body, **response),
        record_id=record_id,
        mode=mode,
        mx=mx,
        max_age=86400,
    )


def _cname_scenario() -> Scenario:
    """_mta-sts.cname is a CNAME chain of two hops ending at a TXT record at another name."""
    plain = _policy_scenario("cname")
    return replace(
        plain,
        txt=(),
        records=(
            ("_mta-sts", "CNAME", "_mta-sts-hop.cname"),
            ("_mta-sts-hop", "CNAME", "sts-target.cname"),
            ("sts-target", "TXT", plain.txt[0]),
        ),
    )


def _scenarios() -> dict[str, Scenario]:
    # Domains without a usable record still serve a policy: a test can check nobody fetched it.
    unused = Response(body=policy_text("enforce", (f"mail.unused.{ZONE}",)))
    oversized = policy_text("enforce", (f"mail.oversized.{ZONE}",))
    oversized += b"x" * (70000 - len(oversized))
    return {
        "enforce": _policy_scenario("enforce", "enforce"),
        "testing": _policy_scenario("testing", "testing"),
        "none": _policy_scenario("none", "none"),
        # No TXT record at all: NXDOMAIN.
        "norecord": Scenario(response=unused),
        # RFC 8461 §3.1: more than one v=STSv1 record means no usable record.
        "tworecords": Scenario(
            txt=("v=STSv1; id=first1;", "v=STSv1; id=second2;"), response=unused
        ),
        # RFC 8461 §3.1: id is 1*32(ALPHA / DIGIT).
        "badrecord": Scenario(txt=("v=STSv1; id=bad-id!",), response=unused),
        # Starts with "v=STSv1;" but has no id field.
        "noid": Scenario(txt=("v=STSv1;",), response=unused),
        # RFC 8461 §3.1: records not starting with "v=STSv1;" are discarded: this is no record.
        "nosemicolon": Scenario(txt=("v=STSv1",), response=unused),
        # A TXT record that is not MTA-STS, next to the real one, is ignored.
        "othertxt": _policy_scenario("othertxt", other_txt=("some other text",)),
        "cname": _cname_scenario(),
        "notfound404": _policy_scenario("notfound404", body=b"not found\n", status=404),
        "error500": _policy_scenario("error500", body=b"oops\n", status=500),
        "redirect": _policy_scenario(
            "redirect",
            status=301,
            headers={"Location": f"https://mta-sts.enforce.{ZONE}{POLICY_PATH}"},
        ),
        "wrongtype": _policy_scenario("wrongtype", content_type="text/html"),
        "oversized": _policy_scenario("oversized", body=oversized),
        "wrongname": _policy_scenario("wrongname", cert="wrongname"),
        "expired": _policy_scenario("expired", cert="expired"),
        "untrusted": _policy_scenario("untrusted", cert="untrusted"),
        # One byte per half second: a 100-byte policy takes ~50 s, far past any test's deadline.
        "slow": _policy_scenario("slow", drip=(1, 0.5)),
        "hang": _policy_scenario("hang", hang=True),
        "badpolicy": _policy_scenario("badpolicy", body=b"version: STSv1\nmode: sometimes\n"),
        # The policy host has no address record.
        "nohost": Scenario(txt=("v=STSv1; id=nohost1;",), record_id="nohost1"),
    }


SCENARIOS: dict[str, Scenario] = _scenarios()


def domain_of(label: str) -> str:
    """The test domain of a scenario label."""
    return f"{label}.{ZONE}"


# --------------------------------------------------------------------------------------------------
# DNS helpers.


def _txt_rdata(value: str | Sequence[str]) -> dns.rdata.Rdata:
    """One TXT RR from raw text (split into 255-byte strings) or from explicit strings."""
    if isinstance(value, str):
        raw = value.encode("utf-8")
        strings = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    else:
        strings = [s.encode("utf-8") for s in value]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)


def _rdata(
    rdtype: dns.rdatatype.RdataType, value: str | Sequence[str], origin: dns.name.Name
) -> dns.rdata.Rdata:
    if rdtype == dns.rdatatype.TXT:
        return _txt_rdata(value)
    if not isinstance(value, str):
        raise TypeError(f"{dns.rdatatype.to_text(rdtype)} value must be zone-file text")
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, value, origin=origin)


def _scenario_rrsets(
    label: str, scenario: Scenario, https_address: str
) -> Iterator[tuple[str, str, list[str | Sequence[str]]]]:
    """(name relative to the zone, type, values) of one scenario; TXT values are raw text."""
    if scenario.txt:
        yield f"_mta-sts.{label}", "TXT", list(scenario.txt)
    if scenario.response is not None:
        yield f"mta-sts.{label}", "A", [https_address]
    for name, rtype, rdata in scenario.records:
        owner = label if name == "@" else f"{name}.{label}"
        yield owner, rtype, [rdata]


def _write_zone_file(path: Path, https_address: str) -> None:
    origin = dns.name.from_text(ZONE)
    zone = dns.zone.Zone(origin)

    def add(name: str, rtype: str, values: Iterable[str | Sequence[str]]) -> None:
        rdtype = dns.rdatatype.from_text(rtype)
        rdataset = zone.find_rdataset(name, rdtype, create=True)
        for value in values:
            rdataset.add(_rdata(rdtype, value, origin), RECORD_TTL)

    # SOA minimum 1: negative answers (RFC 2308) are cached for at most a second too.
    add("@", "SOA", [f"ns.{ZONE}. hostmaster.{ZONE}. 1 60 60 3600 {RECORD_TTL}"])
    add("@", "NS", [f"ns.{ZONE}."])
    add("ns", "A", ["127.0.0.1"])
    for label, scenario in SCENARIOS.items():
        for name, rtype, values in _scenario_rrsets(label, scenario, https_address):
            add(name, rtype, values)
    zone.to_file(str(path), relativize=False)


# --------------------------------------------------------------------------------------------------
# Processes and ports.


def _free_port(address: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on address (DNS servers need both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((address, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((address, port))
                except OSError:
                    continue
                return port
    raise BedError(f"no free UDP+TCP port on {address}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies (Linux prctl)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class _Daemon:
    """A server running in the foreground as a child process, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # A Ctrl-C in the terminal goes to pytest alone, whose teardown stops the server;
                # if pytest dies without a teardown, the kernel stops it (PR_SET_PDEATHSIG).
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def failure(self, what: str) -> BedError:
        return BedError(
            f"{self.name} {what}; last lines of {self.log_path}:\n{_tail(self.log_path)}"
        )

    def wait_until_answering(
        self, port: int, qname: str, rdtype: str, *, need_answer: bool = True
    ) -> None:
        """Query the server until it answers NOERROR (bounded), or fail with its log."""
        query = dns.message.make_query(qname, rdtype)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.failure(f"exited with status {self.process.returncode}")
            try:
                answer = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.3)
            except (OSError, dns.exception.DNSException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if answer.rcode() == dns.rcode.NOERROR and (answer.answer or not need_answer):
                    return
                last = f"rcode {dns.rcode.to_text(answer.rcode())}, {len(answer.answer)} answers"
            time.sleep(0.05)
        raise self.failure(
            f"did not answer {qname} {rdtype} on 127.0.0.1:{port} "
            f"within {STARTUP_TIMEOUT:.0f}s ({last})"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _require(binary: str, package: str) -> None:
    if not (os.access(binary, os.X_OK) or shutil.which(os.path.basename(binary))):
        raise BedError(
            f"{binary} not found: install the Debian package {package} "
            f"(apt-get install {package}, or run tests/run as root, which installs it)"
        )


def _binary(binary: str) -> str:
    return (
        binary if os.access(binary, os.X_OK) else shutil.which(os.path.basename(binary)) or binary
    )


@dataclass(frozen=True)
class _ZoneConfig:
    """A zone knot serves. Later: ``signed`` turns on knot's automatic DNSSEC signing."""

    name: str
    file: Path


def _knot_config(workdir: Path, port: int, zones: Sequence[_ZoneConfig]) -> str:
    zone_entries = "\n".join(
        f'  - domain: "{zone.name}."\n    file: "{zone.file}"\n    acl: loopback_update'
        for zone in zones
    )
    return f"""\
server:
    rundir: "{workdir}/run"
    listen: 127.0.0.1@{port}
    udp-workers: 2
    tcp-workers: 2
    background-workers: 1

log:
  - target: stderr
    any: info

database:
    storage: "{workdir}/db"

acl:
  - id: loopback_update
    address: 127.0.0.0/8
    action: [update, transfer]

template:
  - id: default
    storage: "{workdir}/db"
    # The zone file is only read at start; updates live in the journal, never written back.
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: changes

zone:
{zone_entries}
"""


def _unbound_config(
    workdir: Path,
    port: int,
    stubs: Mapping[str, str],
    trust_anchors: Sequence[str] = (),
) -> str:
    """unbound as a recursive resolver on loopback; stubs maps zone -> "addr@port" of knot.

    With trust_anchors (DS or DNSKEY records in zone-file text) it validates (later issues).
    """
    modules = "validator iterator" if trust_anchors else "iterator"
    anchors = "".join(f'    trust-anchor: "{anchor}"\n' for anchor in trust_anchors)
    # unbound ships a built-in "test." zone answering NXDOMAIN; nodefault lets ours through.
    local_zones = "".join(f'    local-zone: "{_parent(zone)}." nodefault\n' for zone in stubs)
    stub_zones = "".join(
        f'stub-zone:\n    name: "{zone}."\n    stub-addr: {address}\n'
        for zone, address in stubs.items()
    )
    return f"""\
server:
    interface: 127.0.0.1
    port: {port}
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: yes
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{workdir}"
    pidfile: "{workdir}/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    so-reuseport: no
    access-control: 127.0.0.0/8 allow
    # knot listens on loopback, which unbound refuses to query by default.
    do-not-query-localhost: no
    qname-minimisation: no
    module-config: "{modules}"
{anchors}\
    # Cache nothing beyond the moment: a dynamic update to knot is visible on the next query.
    cache-max-ttl: 0
    cache-max-negative-ttl: 0
    # Forget quickly that knot was down (tests may stop it), instead of the default 15 minutes.
    infra-host-ttl: 1
    infra-keep-probing: yes
{local_zones}
{stub_zones}
remote-control:
    control-enable: no
"""


def _parent(zone: str) -> str:
    return zone.split(".", 1)[1] if "." in zone else zone


# --------------------------------------------------------------------------------------------------
# The HTTPS server.


@dataclass(frozen=True)
class Request:
    """One request as the HTTPS server received it."""

    host: str
    sni: str | None
    method: str
    path: str
    headers: Mapping[str, str]


def _strip_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


class _PolicyHandler(BaseHTTPRequestHandler):
    server: _TLSHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "mtasts-testbed/1"
    timeout = HTTPS_IO_TIMEOUT

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        https = self.server.https
        self.close_connection = True
        sni = getattr(self.connection, "mtasts_sni", None)
        host = _strip_port(self.headers.get("Host") or sni or "")
        response = https.record(
            Request(host, sni, self.command, self.path, {k: v for k, v in self.headers.items()})
        )
        stopping = https.stopping
        if response.hang:
            stopping.wait(HANG_LIMIT)
            return
        if response.delay and stopping.wait(response.delay):
            return
        self.send_response(response.status)
        headers = {"Content-Length": str(len(response.body)), "Connection": "close"}
        if response.content_type is not None:
            headers["Content-Type"] = response.content_type
        headers.update(response.headers)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not send_body:
            return
        if response.drip is None:
            self.wfile.write(response.body)
            return
        size, interval = response.drip
        for start in range(0, len(response.body), max(size, 1)):
            self.wfile.write(response.body[start : start + max(size, 1)])
            if stopping.wait(interval):
                return

    def log_message(self, format: str, *args: Any) -> None:
        self.server.https.log(f"{self.client_address[0]} {format % args}")


class _TLSHTTPServer(ThreadingHTTPServer):
    """TLS per connection in the handler thread, so a client that never finishes its handshake
    blocks only its own thread, never the accept loop."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], https: HTTPSServer) -> None:
        self.https = https
        super().__init__(address, _PolicyHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HTTPS_IO_TIMEOUT)
        try:
            tls = self.https.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            # Expected for the certificate scenarios: the client rejects our certificate.
            self.https.log(f"{client_address[0]} TLS handshake failed: {exc}")
            return
        try:
            _PolicyHandler(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the address's host name (getfqdn), which can wait for
        # the system's DNS; the bed must not depend on the machine's resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]  # type: ignore[assignment]

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.https.log(f"{client_address[0]} error:\n{traceback.format_exc()}")


class HTTPSServer:
    """Policy hosts on https://<address>:443 with per-host behaviour; thread-safe."""

    def __init__(self, ca: trustme.CA, address: str, port: int, log_path: Path) -> None:
        self._ca = ca
        self._untrusted_ca = trustme.CA(organization_name="not the test CA")
        self._lock = threading.Lock()
        self._responses: dict[str, Response] = {}
        self._counts: dict[str, int] = {}
        self._requests: dict[str, list[Request]] = {}
        self._contexts: dict[tuple[str, CertKind], ssl.SSLContext] = {}
        self._log_path = log_path
        self.stopping = threading.Event()
        self.context = self._make_context(ca.issue_cert("localhost", address))
        self.context.sni_callback = self._on_sni
        self._server = _TLSHTTPServer((address, port), self)
        self.address: str = self._server.server_address[0]  # type: ignore[assignment]
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    # -- configuration by tests ---------------------------------------------------------------

    def set(
        self,
        host: str,
        *,
        body: bytes | str = b"",
        status: int = 200,
        content_type: str | None = "text/plain",
        delay: float = 0.0,
        drip: tuple[int, float] | None = None,
        hang: bool = False,
        cert: CertKind = "valid",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Replace how ``host`` answers (every path). Unknown hosts answer 404."""
        if cert not in CERT_KINDS:
            raise ValueError(f"cert must be one of {CERT_KINDS}, not {cert!r}")
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.set_response(
            host,
            Response(body, status, content_type, delay, drip, hang, cert, dict(headers or {})),
        )

    def set_response(self, host: str, response: Response) -> None:
        with self._lock:
            self._responses[_strip_port(host)] = response

    def response(self, host: str) -> Response:
        with self._lock:
            return self._responses.get(_strip_port(host), _UNKNOWN_HOST)

    def request_count(self, host: str) -> int:
        with self._lock:
            return self._counts.get(_strip_port(host), 0)

    def requests(self, host: str) -> list[Request]:
        """The requests ``host`` received since the last reset, oldest first."""
        with self._lock:
            return list(self._requests.get(_strip_port(host), ()))

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._requests.clear()

    # -- server side --------------------------------------------------------------------------

    def record(self, request: Request) -> Response:
        with self._lock:
            self._counts[request.host] = self._counts.get(request.host, 0) + 1
            self._requests.setdefault(request.host, []).append(request)
            return self._responses.get(request.host, _UNKNOWN_HOST)

    def log(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with self._lock, open(self._log_path, "a") as log:
            log.write(f"{stamp} {line}\n")

    def _make_context(self, cert: trustme.LeafCert) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        return context

    def _context_for(self, host: str, kind: CertKind) -> ssl.SSLContext:
        with self._lock:
            context = self._contexts.get((host, kind))
        if context is not None:
            return context
        now = datetime.datetime.now(datetime.UTC)
        if kind == "valid":
            cert = self._ca.issue_cert(host)
        elif kind == "wrongname":
            cert = self._ca.issue_cert(WRONG_NAME)
        elif kind == "expired":
            cert = self._ca.issue_cert(
                host,
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            )
        else:
            cert = self._untrusted_ca.issue_cert(host)
        context = self._make_context(cert)
        with self._lock:
            return self._contexts.setdefault((host, kind), context)

    def _on_sni(self, sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any) -> None:
        sock.mtasts_sni = server_name  # type: ignore[union-attr]
        if server_name:
            host = server_name.lower()
            sock.context = self._context_for(host, self.response(host).cert)

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT)


_UNKNOWN_HOST = Response(body=b"no such policy host in the test bed\n", status=404)


def _bind_https(
    ca: trustme.CA, port: int, log_path: Path, address: str | None = None
) -> HTTPSServer:
    """Bind port 443 on a random 127.x address, so several test runs on one machine coexist."""
    if address:
        candidates = [address]
    else:
        candidates = [
            f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            for _ in range(20)
        ]
        candidates.append("127.0.0.1")
    last: OSError | None = None
    for candidate in candidates:
        try:
            return HTTPSServer(ca, candidate, port, log_path)
        except PermissionError as exc:
            raise BedError(
                f"cannot bind the HTTPS server to {candidate}:{port} ({exc}): the policy fetch "
                "goes to port 443, which needs root; run the tests as root (sudo tests/run)"
            ) from exc
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
            last = exc
    raise BedError(f"cannot bind the HTTPS server to port {port} on loopback: {last}")


# --------------------------------------------------------------------------------------------------
# The dead nameserver.


class _DeadNameserver:
    """A UDP and a TCP socket on one port that never answer: queries time out."""

    def __init__(self) -> None:
        for _ in range(100):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port: int = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
            except OSError:
                self.udp.close()
                self.tcp.close()
                continue
            # The kernel completes TCP handshakes into the backlog; nobody ever reads.
            self.tcp.listen(64)
            return
        raise BedError("no free UDP+TCP port for the dead nameserver")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


# --------------------------------------------------------------------------------------------------
# The bed.


class Bed:
    """The running servers. Use ``Bed.start(workdir)`` and ``stop()`` (or ``with``)."""

    zone: str = ZONE

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._daemons: list[_Daemon] = []
        self._closers: list[Any] = []
        self.resolver_nameservers: list[str] = []
        self.auth_nameservers: list[str] = []
        self.ca_file = ""
        self.dead_nameserver = ""
        self.knot_port = 0
        self.unbound_port = 0

    @classmethod
    def start(cls, workdir: Path, *, https_port: int = 443) -> Bed:
        bed = cls(workdir)
        try:
            bed._start(https_port)
        except BaseException:
            bed.stop()
            raise
        return bed

    def _start(self, https_port: int) -> None:
        _require(KNOTD, "knot")
        _require(UNBOUND, "unbound")
        self.ca = trustme.CA(organization_name="postfix-mtasts test bed")
        ca_path = self.workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(ca_path))
        self.ca_file = str(ca_path)

        self.https = _bind_https(self.ca, https_port, self.workdir / "https.log")
        self._closers.append(self.https.close)
        self.https_address = self.https.address
        self.https_port = self.https.port

        dead = _DeadNameserver()
        self._closers.append(dead.close)
        self.dead_nameserver = dead.address

        self._start_knot()
        self._start_unbound()

        for label, scenario in SCENARIOS.items():
            if scenario.response is not None:
                self.https.set_response(f"mta-sts.{domain_of(label)}", scenario.response)

    def _start_knot(self) -> None:
        knot_dir = self.workdir / "knot"
        for sub in ("run", "db", "zones"):
            (knot_dir / sub).mkdir(parents=True, exist_ok=True)
        zone_file = knot_dir / "zones" / f"{ZONE}.zone"
        _write_zone_file(zone_file, self.https_address)
        self.knot_port = _free_port()
        config = knot_dir / "knot.conf"
        config.write_text(_knot_config(knot_dir, self.knot_port, [_ZoneConfig(ZONE, zone_file)]))
        knot = _Daemon("knotd", [_binary(KNOTD), "-c", str(config)], knot_dir / "knot.log")
        self._daemons.append(knot)
        knot.wait_until_answering(self.knot_port, ZONE, "SOA")
        self.auth_nameservers = [f"127.0.0.1:{self.knot_port}"]

    def _start_unbound(self) -> None:
        unbound_dir = self.workdir / "unbound"
        unbound_dir.mkdir(parents=True, exist_ok=True)
        self.unbound_port = _free_port()
        config = unbound_dir / "unbound.conf"
        config.write_text(
            _unbound_config(unbound_dir, self.unbound_port, {ZONE: f"127.0.0.1@{self.knot_port}"})
        )
        unbound = _Daemon(
            "unbound", [_binary(UNBOUND), "-d", "-c", str(config)], unbound_dir / "unbound.log"
        )
        self._daemons.append(unbound)
        unbound.wait_until_answering(self.unbound_port, f"_mta-sts.enforce.{ZONE}", "TXT")
        self.resolver_nameservers = [f"127.0.0.1:{self.unbound_port}"]

    def stop(self) -> None:
        for daemon in reversed(self._daemons):
            daemon.stop()
        self._daemons.clear()
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                close()
        self._closers.clear()

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests --------------------------------------------------------------------

    def domain(self, label: str) -> str:
        """``<label>.mtasts.test``."""
        return domain_of(label)

    def unique_domain(self, prefix: str = "d") -> str:
        """A fresh domain in the zone that no other test uses (for tests that change records)."""
        with _unique_lock:
            _unique_counter[0] += 1
            return domain_of(f"{prefix}{_unique_counter[0]}-{os.getpid()}")

    def add_domain(self, domain: str, scenario: Scenario) -> None:
        """Publish a scenario's records and policy host under ``domain`` (in the zone)."""
        label = self._relative(domain)
        for name, rtype, values in _scenario_rrsets(label, scenario, self.https_address):
            self.dns_set(name, rtype, values)
        if scenario.response is not None:
            self.https.set_response(f"mta-sts.{domain.rstrip('.').lower()}", scenario.response)

    def dns_set(
        self, name: str, rtype: str, values: Sequence[str | Sequence[str]], ttl: int = RECORD_TTL
    ) -> None:
        """Replace the RRset ``name``/``rtype`` in knot by dynamic update (empty values: delete).

        ``name`` is absolute (``x.mtasts.test``, trailing dot optional) or relative to the zone.
        TXT values are the raw text (or a sequence of its strings); other types are zone-file rdata,
        with names relative to the zone.
        """
        origin = dns.name.from_text(ZONE)
        owner = dns.name.from_text(self._relative(name), origin)
        rdtype = dns.rdatatype.from_text(rtype)
        update = dns.update.UpdateMessage(origin)
        if values:
            rdataset = dns.rdataset.Rdataset(dns.rdataclass.IN, rdtype)
            for value in values:
                rdataset.add(_rdata(rdtype, value, origin), ttl)
            update.replace(owner, rdataset)
        else:
            update.delete(owner, rdtype)
        self._send_update(update, f"{owner} {rtype}")

    def dns_delete(self, name: str, rtype: str | None = None) -> None:
        """Delete the RRset ``name``/``rtype`` (every RRset of the name when rtype is None)."""
        origin = dns.name.from_text(ZONE)
        owner = dns.name.from_text(self._relative(name), origin)
        update = dns.update.UpdateMessage(origin)
        if rtype is None:
            update.delete(owner)
        else:
            update.delete(owner, dns.rdatatype.from_text(rtype))
        self._send_update(update, f"{owner} {rtype or 'ANY'}")

    def _send_update(self, update: dns.update.UpdateMessage, what: str) -> None:
        try:
            answer = dns.query.tcp(update, "127.0.0.1", port=self.knot_port, timeout=5)
        except (OSError, dns.exception.DNSException) as exc:
            raise BedError(f"dynamic update of {what} failed: {exc}") from exc
        if answer.rcode() != dns.rcode.NOERROR:
            raise BedError(f"dynamic update of {what} refused: {dns.rcode.to_text(answer.rcode())}")

    def _relative(self, name: str) -> str:
        """``name`` relative to the zone ("@" for the apex); absolute names must be in the zone."""
        name = name.rstrip(".").lower()
        if name == ZONE:
            return "@"
        if name.endswith("." + ZONE):
            return name[: -len(ZONE) - 1]
        return name


_unique_lock = threading.Lock()
_unique_counter = [0]
