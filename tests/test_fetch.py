"""``postfix_mtasts.fetch`` against the bed's real HTTPS policy hosts and DNS.

The policy hosts' names exist only in the bed's DNS (knot behind unbound): a fetch that works at
all went to an address our resolver found, never the system resolver. The bed's server records the
Host header, SNI and headers of each request, and answers per host as the scenario says.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import urllib3.exceptions
from bed import SCENARIOS, Bed

from postfix_mtasts import __version__
from postfix_mtasts.fetch import (
    POLICY_PATH,
    CertificateError,
    Fetcher,
    FetchError,
    HTTPStatusError,
    is_public,
)
from postfix_mtasts.resolver import DNSNotFound, Resolver

# Short enough for the slow and hanging hosts to cost little, long enough for loopback.
DEADLINE = 2.0
# How much later than its deadline a fetch may give up: thread scheduling, not a drip's pace.
GRACE = 5.0


def policy_host(label: str) -> str:
    return f"mta-sts.{label}.mtasts.test"


def url_of(host: str) -> str:
    return f"https://{host}{POLICY_PATH}"


@pytest.fixture
def resolver(bed: Bed) -> Resolver:
    return Resolver(bed.resolver_nameservers, timeout=2.0)


@pytest.fixture
def fetcher(bed: Bed, resolver: Resolver) -> Fetcher:
    return Fetcher(
        resolver,
        ca_file=bed.ca_file,
        timeout=DEADLINE,
        connect_timeout=DEADLINE,
        allow_private_addresses=True,  # the bed's servers are on loopback
    )


def new_policy_host(bed: Bed, prefix: str, **response: object) -> str:
    """A fresh policy host with an A record for the bed's HTTPS server, answering as told."""
    host = f"mta-sts.{bed.unique_domain(prefix)}"
    bed.dns_set(host, "A", [bed.https_address])
    bed.https.set(host, **response)  # type: ignore[arg-type]
    return host


# --------------------------------------------------------------------------------------------------
# A policy is served.


def test_fetch_returns_the_policy_body(fetcher: Fetcher) -> None:
    response = SCENARIOS["enforce"].response
    assert response is not None
    assert fetcher.get(policy_host("enforce")) == response.body


def test_request_carries_host_name_in_sni_host_header_and_user_agent(
    bed: Bed, fetcher: Fetcher
) -> None:
    host = new_policy_host(bed, "headers", body=b"version: STSv1\n")
    fetcher.get(host)
    (request,) = bed.https.requests(host)
    assert request.sni == host
    assert request.host == host
    assert request.method == "GET"
    assert request.path == POLICY_PATH
    headers = {name.lower(): value for name, value in request.headers.items()}
    assert headers["user-agent"] == f"postfix-mtasts/{__version__}"
    assert headers["host"] == host


@pytest.mark.parametrize(
    "content_type", ["text/plain", "text/plain; charset=utf-8", "TEXT/Plain ;charset=us-ascii"]
)
def test_text_plain_with_parameters_and_any_case_is_accepted(
    bed: Bed, fetcher: Fetcher, content_type: str
) -> None:
    host = new_policy_host(bed, "ctype", body=b"version: STSv1\n", content_type=content_type)
    assert fetcher.get(host) == b"version: STSv1\n"


def test_body_of_exactly_the_size_limit_is_accepted(bed: Bed, fetcher: Fetcher) -> None:
    body = b"x" * fetcher.max_size
    host = new_policy_host(bed, "fits", body=body)
    assert fetcher.get(host) == body


def test_next_address_is_tried_when_one_refuses(bed: Bed, unused_loopback: str) -> None:
    # knot (asked directly) gives the addresses in canonical order, so the refusing 127.0.0.x
    # comes first; unbound would rotate them.
    authoritative = Resolver(bed.auth_nameservers, timeout=2.0)
    fetcher = Fetcher(
        authoritative, ca_file=bed.ca_file, timeout=DEADLINE, allow_private_addresses=True
    )
    host = new_policy_host(bed, "second", body=b"version: STSv1\n")
    bed.dns_set(host, "A", [bed.https_address, unused_loopback])
    ipv4 = next(authoritative.address_families(host))
    assert ipv4[0] == unused_loopback, "precondition: refusing one first"
    assert fetcher.get(host) == b"version: STSv1\n"


def test_one_fetcher_serves_many_threads(fetcher: Fetcher) -> None:
    labels = ["enforce", "testing", "none"] * 4
    with ThreadPoolExecutor(max_workers=6) as pool:
        bodies = list(pool.map(lambda label: fetcher.get(policy_host(label)), labels))
    for label, body in zip(labels, bodies, strict=True):
        assert f"mode: {label}\n".encode() in body


def test_hosts_on_one_address_never_share_a_connection(bed: Bed, fetcher: Fetcher) -> None:
    # One adapter serves every fetch; its pools are per host name, so each fetch sends its own
    # host's SNI and verifies its own host's certificate, also right after another host's fetch.
    first = new_policy_host(bed, "shared-a", body=b"version: STSv1\n")
    second = new_policy_host(bed, "shared-b", body=b"version: STSv1\n")
    for host in (first, second, first):
        assert fetcher.get(host) == b"version: STSv1\n"
    assert [r.sni for r in bed.https.requests(first)] == [first, first]
    assert [r.sni for r in bed.https.requests(second)] == [second]
    with pytest.raises(CertificateError, match="Hostname mismatch"):
        fetcher.get(policy_host("wrongname"))
    assert fetcher.get(first) == b"version: STSv1\n"


# --------------------------------------------------------------------------------------------------
# HTTP answers that are not a policy.


@pytest.mark.parametrize(("label", "status"), [("notfound404", 404), ("error500", 500)])
def test_status_other_than_200_is_an_http_status_error(
    fetcher: Fetcher, label: str, status: int
) -> None:
    host = policy_host(label)
    with pytest.raises(HTTPStatusError) as raised:
        fetcher.get(host)
    assert raised.value.status == status
    assert str(raised.value) == f"{url_of(host)}: HTTP {status}"


def test_redirect_is_not_followed(bed: Bed, fetcher: Fetcher) -> None:
    target = policy_host("enforce")
    before = bed.https.request_count(target)
    host = policy_host("redirect")
    with pytest.raises(HTTPStatusError) as raised:
        fetcher.get(host)
    assert raised.value.status == 301
    # The redirect's target (its Location header) is named in the message.
    assert str(raised.value) == (
        f"{url_of(host)}: redirect (HTTP 301 to {url_of(target)}) not followed"
    )
    assert bed.https.request_count(target) == before


def test_wrong_media_type_is_refused(fetcher: Fetcher) -> None:
    host = policy_host("wrongtype")
    with pytest.raises(FetchError) as raised:
        fetcher.get(host)
    assert not isinstance(raised.value, HTTPStatusError)
    assert str(raised.value) == f"{url_of(host)}: media type text/html, expected text/plain"


def test_missing_media_type_is_refused(bed: Bed, fetcher: Fetcher) -> None:
    host = new_policy_host(bed, "notype", body=b"version: STSv1\n", content_type=None)
    with pytest.raises(FetchError, match="no media type, expected text/plain"):
        fetcher.get(host)


def test_compressed_body_is_refused(bed: Bed, fetcher: Fetcher) -> None:
    # We ask for identity: the size limit is on the bytes received, not on what they inflate to.
    host = new_policy_host(
        bed, "gzip", body=b"\x1f\x8b not really", headers={"Content-Encoding": "gzip"}
    )
    with pytest.raises(FetchError, match="content encoding gzip"):
        fetcher.get(host)


# --------------------------------------------------------------------------------------------------
# Limits: size and time.


def test_body_announced_larger_than_the_limit_is_refused(fetcher: Fetcher) -> None:
    host = policy_host("oversized")  # 70000 bytes with their Content-Length
    with pytest.raises(FetchError) as raised:
        fetcher.get(host)
    assert str(raised.value) == f"{url_of(host)}: policy larger than 65536 bytes"


def test_reading_stops_once_the_body_passes_the_limit(bed: Bed, resolver: Resolver) -> None:
    # No usable Content-Length, and a body that would take the server minutes to send: the fetch
    # ends with "larger than" long before its deadline, so it stopped reading after the limit.
    fetcher = Fetcher(
        resolver, ca_file=bed.ca_file, timeout=60.0, allow_private_addresses=True, max_size=1000
    )
    host = new_policy_host(
        bed,
        "endless",
        body=b"x" * 10_000_000,
        drip=(500, 0.05),
        headers={"Content-Length": "unknown"},
    )
    started = time.monotonic()
    with pytest.raises(FetchError) as raised:
        fetcher.get(host)
    assert str(raised.value) == f"{url_of(host)}: policy larger than 1000 bytes"
    assert time.monotonic() - started < 10.0


@pytest.mark.parametrize("label", ["slow", "hang"])
def test_slow_or_silent_server_is_cut_at_the_deadline(fetcher: Fetcher, label: str) -> None:
    # "slow" sends one byte every half second: each read succeeds well within any per-read
    # timeout, so only a deadline over the whole fetch stops it.
    started = time.monotonic()
    with pytest.raises(FetchError) as raised:
        fetcher.get(policy_host(label))
    elapsed = time.monotonic() - started
    assert "timed out" in str(raised.value)
    assert str(raised.value).startswith(f"{url_of(policy_host(label))}: timed out")
    assert elapsed < DEADLINE + GRACE


def test_headers_arriving_after_the_deadline_time_out(bed: Bed, fetcher: Fetcher) -> None:
    host = new_policy_host(bed, "late", body=b"version: STSv1\n", delay=DEADLINE + 3)
    with pytest.raises(FetchError) as raised:
        fetcher.get(host)
    assert str(raised.value) == f"{url_of(host)}: timed out: no answer within {DEADLINE}s"


# --------------------------------------------------------------------------------------------------
# Certificates: RFC 8461 §3.3, valid for the host under the WebPKI.


@pytest.mark.parametrize(
    ("label", "reason"),
    [
        ("expired", "certificate has expired"),
        ("wrongname", "Hostname mismatch"),
        ("untrusted", "unable to get local issuer certificate"),
    ],
)
def test_invalid_certificate_is_a_certificate_error(
    bed: Bed, fetcher: Fetcher, label: str, reason: str
) -> None:
    host = policy_host(label)
    before = bed.https.request_count(host)
    with pytest.raises(CertificateError) as raised:
        fetcher.get(host)
    message = str(raised.value)
    assert message.startswith(f"{url_of(host)}: certificate verify failed: "), message
    assert reason in message
    # The TLS layer's own verdict is kept behind the message.
    assert isinstance(raised.value.__cause__, ssl.SSLCertVerificationError)
    assert bed.https.request_count(host) == before  # no request went over that connection


def test_system_store_does_not_trust_the_test_ca(bed: Bed, resolver: Resolver) -> None:
    fetcher = Fetcher(resolver, allow_private_addresses=True, timeout=DEADLINE)
    with pytest.raises(CertificateError, match="certificate verify failed"):
        fetcher.get(policy_host("enforce"))


# --------------------------------------------------------------------------------------------------
# Addresses: ours, and only public ones unless allowed.


def test_private_address_is_refused_without_connecting(bed: Bed, resolver: Resolver) -> None:
    fetcher = Fetcher(resolver, ca_file=bed.ca_file, timeout=DEADLINE)
    host = policy_host("enforce")
    before = bed.https.request_count(host)
    with pytest.raises(FetchError) as raised:
        fetcher.get(host)
    assert str(raised.value) == (
        f"{url_of(host)}: address {bed.https_address} is not public "
        "(set allow_private_addresses to allow)"
    )
    assert bed.https.request_count(host) == before


@pytest.mark.parametrize(
    ("rtype", "address"),
    [
        ("A", "10.1.2.3"),
        ("A", "172.16.0.1"),
        ("A", "192.168.1.1"),
        ("A", "100.64.0.1"),  # shared address space (carrier-grade NAT)
        ("A", "169.254.169.254"),  # link-local (cloud metadata)
        ("A", "0.0.0.0"),
        ("A", "224.0.0.1"),  # multicast
        ("A", "240.0.0.1"),  # reserved
        ("A", "192.0.2.1"),  # documentation
        ("AAAA", "::1"),
        ("AAAA", "fe80::1"),
        ("AAAA", "fc00::1"),  # unique local
        ("AAAA", "ff02::1"),  # multicast
        ("AAAA", "::ffff:10.1.2.3"),  # IPv4-mapped private
        ("AAAA", "2001:db8::1"),  # documentation
        # IPv6 forms that embed a loopback or private IPv4 address: judged by what they embed.
        ("AAAA", "2002:a01:203::"),  # 6to4 of 10.1.2.3
        ("AAAA", "64:ff9b::7f00:1"),  # NAT64 of 127.0.0.1
        ("AAAA", "::127.0.0.1"),  # IPv4-compatible 127.0.0.1
        ("AAAA", "2001:0:4136:e378:8000:63bf:f5fe:fefe"),  # Teredo, client 10.1.1.1
    ],
)
def test_non_public_addresses_are_refused(
    bed: Bed, resolver: Resolver, rtype: str, address: str
) -> None:
    fetcher = Fetcher(resolver, ca_file=bed.ca_file, timeout=DEADLINE)
    host = f"mta-sts.{bed.unique_domain('private')}"
    bed.dns_set(host, rtype, [address])
    with pytest.raises(FetchError, match=r"is not public \(set allow_private_addresses to allow\)"):
        fetcher.get(host)


def test_6to4_address_of_loopback_is_refused_without_connecting(
    bed: Bed, resolver: Resolver
) -> None:
    # 2002:7f00:1:: is 6to4 for 127.0.0.1 (RFC 3056): a relay would deliver it to loopback.
    fetcher = Fetcher(
        resolver, ca_file=bed.ca_file, timeout=DEADLINE, allow_private_addresses=False
    )
    host = f"mta-sts.{bed.unique_domain('sixtofour')}"
    bed.dns_set(host, "AAAA", ["2002:7f00:1::"])
    with pytest.raises(FetchError) as raised:
        fetcher.get(host)
    assert str(raised.value) == (
        f"{url_of(host)}: address 2002:7f00:1:: is not public "
        "(set allow_private_addresses to allow)"
    )


def _teredo(server: str, client: str) -> str:
    """The Teredo address (RFC 4380 §4) of a client behind ``client`` using ``server``: the
    prefix 2001::/32, the server's IPv4 address, then the client's with every bit inverted."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    return str(ipaddress.IPv6Address(value | (int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF)))


# An address, and whether the fetch may connect to it without allow_private_addresses.
ADDRESSES: list[tuple[str, bool]] = [
    ("192.0.2.1", False),  # documentation
    ("8.8.8.8", True),
    ("127.0.0.1", False),
    ("10.1.2.3", False),
    ("2001:4860:4860::8888", True),
    ("::1", False),
    ("::", False),
    ("fe80::1", False),
    # IPv4-mapped (RFC 4291 §2.5.5.2).
    ("::ffff:8.8.8.8", True),
    ("::ffff:127.0.0.1", False),
    ("::ffff:10.1.2.3", False),
    ("::ffff:169.254.169.254", False),
    # IPv4-compatible (RFC 4291 §2.5.5.1, deprecated): ::/96.
    ("::8.8.8.8", True),
    ("::127.0.0.1", False),
    ("::192.168.1.1", False),
    # 6to4 (RFC 3056): 2002:V4ADDR::/48.
    ("2002:808:808::", True),
    ("2002:808:808:1:2:3:4:5", True),
    ("2002:7f00:1::", False),  # 127.0.0.1
    ("2002:a01:203::1", False),  # 10.1.2.3
    ("2002:c0a8:101::", False),  # 192.168.1.1
    ("2002:a9fe:a9fe::", False),  # 169.254.169.254
    ("2002:6440:1::", False),  # 100.64.0.1, shared address space
    ("2002:e000:1::", False),  # 224.0.0.1, multicast
    # NAT64 well-known prefix (RFC 6052 §2.1): 64:ff9b::/96.
    ("64:ff9b::808:808", True),
    ("64:ff9b::8.8.4.4", True),
    ("64:ff9b::7f00:1", False),
    ("64:ff9b::10.1.2.3", False),
    ("64:ff9b::192.168.1.1", False),
    ("64:ff9b::0.0.0.0", False),
    # RFC 8215's local-use NAT64 prefix embeds IPv4 where the network says: never public.
    ("64:ff9b:1::808:808", False),
    # Teredo (RFC 4380): both the server and the client must be public.
    (_teredo("65.54.227.120", "8.8.8.8"), True),
    (_teredo("65.54.227.120", "127.0.0.1"), False),
    (_teredo("65.54.227.120", "192.168.1.1"), False),
    (_teredo("10.0.0.1", "8.8.8.8"), False),
    (_teredo("127.0.0.1", "8.8.8.8"), False),
]


@pytest.mark.parametrize(("text", "public"), ADDRESSES)
def test_embedded_ipv4_is_judged_by_the_address_it_embeds(text: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(text)) is public


def test_host_without_address_is_a_fetch_error_naming_the_dns_answer(fetcher: Fetcher) -> None:
    host = policy_host("nohost")
    with pytest.raises(FetchError) as raised:
        fetcher.get(host)
    assert str(raised.value) == f"{url_of(host)}: {host} A/AAAA: NXDOMAIN"
    assert isinstance(raised.value.__cause__, DNSNotFound)


def test_no_address_accepting_connections_is_a_fetch_error(
    bed: Bed, fetcher: Fetcher, unused_loopback: str
) -> None:
    host = f"mta-sts.{bed.unique_domain('refused')}"
    bed.dns_set(host, "A", [unused_loopback])
    # Tried after the IPv4 address; refused, or unreachable where the machine has no IPv6.
    bed.dns_set(host, "AAAA", ["::1"])
    with pytest.raises(FetchError) as raised:
        fetcher.get(host)
    message = str(raised.value)
    assert message.startswith(
        f"{url_of(host)}: cannot connect to {unused_loopback} port 443 (connection refused), "
        "::1 port 443 ("
    ), message
    # urllib3's account of the last refusal is kept behind the message.
    assert isinstance(raised.value.__cause__, urllib3.exceptions.NewConnectionError)


# --------------------------------------------------------------------------------------------------
# The environment is ignored; a configured proxy is used.


def test_environment_proxy_and_ca_bundle_are_ignored(
    bed: Bed, resolver: Resolver, fetcher: Fetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # nothing listens: would fail
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", bed.ca_file)
    monkeypatch.setenv("CURL_CA_BUNDLE", bed.ca_file)
    assert fetcher.get(policy_host("enforce")).startswith(b"version: STSv1")
    # With the test CA only in the environment, the certificate is not trusted.
    system_store = Fetcher(resolver, allow_private_addresses=True, timeout=DEADLINE)
    with pytest.raises(CertificateError):
        system_store.get(policy_host("enforce"))


def test_configured_proxy_is_asked_to_connect_to_the_resolved_address(
    bed: Bed, resolver: Resolver, connect_proxy: ConnectProxy
) -> None:
    fetcher = Fetcher(
        resolver,
        ca_file=bed.ca_file,
        timeout=DEADLINE,
        allow_private_addresses=True,
        proxies={"https": connect_proxy.url},
    )
    host = policy_host("enforce")
    assert fetcher.get(host).startswith(b"version: STSv1")
    assert connect_proxy.targets == [f"{bed.https_address}:443"]
    assert bed.https.requests(host)[-1].sni == host


# --------------------------------------------------------------------------------------------------
# Helpers: an address nobody listens on, and a CONNECT proxy.


@pytest.fixture
def unused_loopback(bed: Bed) -> str:
    """A loopback address (127.0.0.x) where port 443 refuses connections."""
    for last in range(2, 255):
        address = f"127.0.0.{last}"
        if address == bed.https_address:
            continue
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((address, 443)) != 0:
                return address
    pytest.fail("no loopback address without a listener on port 443")


class ConnectProxy:
    """An HTTP proxy on loopback that only does CONNECT, and records where it was asked to go."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            client.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(1)
                if not data:
                    return
                head += data
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            self.targets.append(target)
            host, _, port = target.rpartition(":")
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            upstream = stack.enter_context(socket.create_connection((host.strip("[]"), int(port))))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
            back.start()
            self._pipe(client, upstream)
            back.join(10)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(2)


@pytest.fixture
def connect_proxy() -> Iterator[ConnectProxy]:
    proxy = ConnectProxy()
    yield proxy
    proxy.close()
