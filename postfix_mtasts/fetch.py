"""The HTTPS GET of an MTA-STS policy (RFC 8461 §3.3), with requests, and nothing it does not need.

A policy is fetched from ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. What makes this more
than ``requests.get(url)``:

- The host name is looked up through our ``Resolver`` (the same nameservers as every other query),
  never the system resolver, and the TCP connection goes to an address it found. SNI, certificate
  verification and the ``Host`` header stay those of the host name.
- Addresses that are not public (loopback, private, link-local, ...) are refused unless
  ``allow_private_addresses`` is set: a policy domain must not make the daemon probe the
  network it runs in.
- The certificate must be valid for the host under the WebPKI: the CA file given, or the system's
  store (not certifi's bundle); TLS 1.2 or newer (§3.3).
- No redirects (§3.3: "MUST NOT follow"), only status 200, media type ``text/plain``.
- Limits, named and enforced where bytes enter: at most ``max_size`` bytes are read (§3.3 suggests
  64 KiB), and one deadline covers connecting, the TLS handshake, the headers and the body, so a
  server that drips one byte a second cannot hold a thread past it.
- No proxy and no CA bundle from the environment (``https_proxy``, ``REQUESTS_CA_BUNDLE``); a proxy
  only when one is configured. No HTTP cache (§3.3) — requests keeps none.

Every failure is a ``FetchError`` whose message names the URL and the cause in plain words, but for
one kind: when this machine ran out of something the fetch needs (file descriptors, buffers), the
error is the resolver's ``LocalError``, which says nothing about the policy host.
A ``Fetcher`` is safe to share between threads: its requests adapter and its TLS context, with
the trust anchors, are built once and shared.
"""

from __future__ import annotations

import ipaddress
import math
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import requests
import requests.adapters
import urllib3
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.response

from postfix_mtasts import __version__
from postfix_mtasts.resolver import (
    AddressOutcome,
    DNSFailure,
    LocalError,
    Resolver,
    local_cause,
)

__all__ = [
    "MAX_POLICY_SIZE",
    "POLICY_PATH",
    "USER_AGENT",
    "CertificateError",
    "FetchError",
    "Fetcher",
    "HTTPStatusError",
]

POLICY_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 §3.2
MAX_POLICY_SIZE = 65536  # RFC 8461 §3.3: "a maximum of 64 KiB"
USER_AGENT = f"postfix-mtasts/{__version__}"
HTTPS_PORT = 443

# Bytes asked of the socket per read while receiving the body; small enough that the deadline
# and the size limit are checked often, large enough that a policy takes a read or two.
_CHUNK_SIZE = 8192


class FetchError(Exception):
    """The policy body could not be fetched; the message names the URL and the cause."""


class HTTPStatusError(FetchError):
    """The server answered with a status other than 200 (a 3xx is not followed: RFC 8461 §3.3)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CertificateError(FetchError):
    """The server's certificate is not valid for the host (expired, other name, unknown CA)."""


# --- One deadline for every socket operation -------------------------------------------------
#
# requests and urllib3 only know per-operation timeouts: each recv() may wait that long again, so
# a server sending one byte a second never trips a 10 s read timeout. The TLS socket class of our
# SSLContext (``SSLContext.sslsocket_class``, a documented extension point of the ssl module) sets
# each handshake step, read and write's timeout to what is left until the deadline, and fails at
# once when nothing is left. Headers and body both go through those reads, so the deadline holds
# whatever the server does. The TCP connect itself is bounded by the connect timeout, which is
# never more than what is left either.


# The deadline of the fetch running in this thread (time.monotonic()). One SSLContext serves every
# fetch: building one means loading the trust anchors again (the whole system store by default), so
# the deadline of each fetch lives with its thread instead, which is where requests does its I/O.
_deadline = threading.local()


class _DeadlineSSLContext(ssl.SSLContext):
    """An SSLContext whose sockets stop at the deadline of the fetch in their thread."""


class _DeadlineSSLSocket(ssl.SSLSocket):
    def _limit_to_deadline(self) -> None:
        deadline: float = getattr(_deadline, "value", math.inf)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline reached")
        current = self.gettimeout()
        if current is None or current > remaining:
            self.settimeout(remaining)

    def do_handshake(self, block: bool = False) -> None:
        self._limit_to_deadline()
        super().do_handshake(block)

    def read(self, len: int = 1024, buffer: Any = None) -> bytes:  # the base class's names
        self._limit_to_deadline()
        return super().read(len, buffer)

    def send(self, data: Any, flags: int = 0) -> int:
        self._limit_to_deadline()
        return super().send(data, flags)


_DeadlineSSLContext.sslsocket_class = _DeadlineSSLSocket


# --- Connecting to the address we resolved ---------------------------------------------------
#
# The request goes to a URL naming the IP address (https://192.0.2.1/...), so urllib3 dials exactly
# that address and never consults the system resolver. The transport adapter gives each pool the
# policy host as ``server_hostname``: the TLS layer sends SNI for it and verifies the certificate
# against it, and the ``Host`` header names it. The check is ssl's own (our context has
# check_hostname on), so a failure is the TLS layer's ssl.SSLCertVerificationError. urllib3's
# ``assert_hostname`` is not set: given one, urllib3 turns the shared context's check_hostname off
# and matches the name itself after the handshake, a second check with other errors.
#
# This is requests' extension point for it (``build_connection_pool_key_attributes``, public
# since requests 2.32.2): the pool key carries the host name and our SSL context, so two hosts
# on one address never share a connection, and requests' own ``send`` does the rest, with no
# retries and no redirects. Through a configured proxy the same pool settings apply, and the
# proxy is asked to CONNECT to the address we resolved. The request is handed to the adapter
# directly: a Session would merge environment settings, cookies and hooks that a policy fetch
# must not have.


def _host_of(host_header: str) -> str:
    """The host name of a ``Host`` header we wrote (``host`` or ``host:port``; no IPv6 literal)."""
    return host_header.partition(":")[0]


class _PinnedHostAdapter(requests.adapters.HTTPAdapter):
    """Sends requests addressed to an IP, with SNI and certificate check for the host named in
    the request's ``Host`` header, and the trust anchors of ``ssl_context`` only."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl_context = ssl_context
        # No retries: a failed connection moves on to the host's next address (Fetcher.get),
        # under one deadline. Connections are not kept (every request says "Connection: close").
        super().__init__(max_retries=0, pool_connections=16, pool_maxsize=1)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> Any:  # (host_params, pool_kwargs); the stubs' pool_kwargs type lacks the TLS keys
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        tls_kwargs: dict[str, Any] = {
            **pool_kwargs,
            "server_hostname": _host_of(request.headers["Host"]),
            "ssl_context": self._ssl_context,
        }
        return host_params, tls_kwargs

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: Any,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> urllib3.connectionpool.ConnectionPool:
        """A pool of its own for a request sent directly, requests' pools through a proxy.

        A policy fetch never reuses its connection ("Connection: close"), so keeping a pool per
        host in the pool manager would only add a key, an eviction and a lock shared by every
        lookup thread to each fetch.
        """
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        return urllib3.HTTPSConnectionPool(
            host_params["host"], host_params["port"], maxsize=1, **pool_kwargs
        )

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would load certifi's bundle into the connection (verify=True means "its
        # default CAs"); the trust anchors are already in our SSLContext, and nothing else.
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None


class _ConnectFailed(Exception):
    """The TCP connection to one address could not be made; the next address may work."""

    def __init__(self, address: str, cause: str) -> None:
        super().__init__(f"{address} ({cause})")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it: chained ones, urllib3's ``reason`` and exceptions
    passed as arguments (requests wraps urllib3's errors that way)."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            pending.append(reason)
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        if current.__context__ is not None:
            pending.append(current.__context__)


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    return next((cause for cause in _causes(exc) if isinstance(cause, kind)), None)


def _plain_cause(exc: BaseException) -> str:
    """The most specific words available for a failure, e.g. "Connection refused"."""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    innermost = list(_causes(exc))[-1]
    return str(innermost) or type(innermost).__name__


# RFC 6052 §2.1: the NAT64 well-known prefix, IPv4 address in the last 32 bits. Its local-use
# sibling 64:ff9b:1::/48 (RFC 8215) places the IPv4 address where each network decides, so it
# cannot be read back and stays refused as the non-global prefix it is.
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 4291 §2.5.5.1: IPv4-compatible addresses (deprecated), ::a.b.c.d. It also holds :: and ::1,
# which embed 0.0.0.0 and 0.0.0.1 and are refused as such.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries packets to, or () when it embeds none."""
    if address.ipv4_mapped is not None:  # RFC 4291 §2.5.5.2: ::ffff:a.b.c.d
        return (address.ipv4_mapped,)
    if address.sixtofour is not None:  # RFC 3056: 2002:AABB:CCDD::/48, a relay delivers it
        return (address.sixtofour,)
    if address.teredo is not None:  # RFC 4380: the server relays, the client receives
        return address.teredo
    if address in _NAT64_WELL_KNOWN or address in _IPV4_COMPATIBLE:
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    return ()


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        # A form that embeds IPv4 reaches the IPv4 address it embeds (2002:7f00:1:: is
        # 127.0.0.1 through a 6to4 relay), so that address decides, whatever the IPv6 prefix's
        # own class (which also differs between Python versions: 2002::/16 is global in 3.11,
        # not in 3.13). Teredo involves two: both must be public.
        embedded = _embedded_ipv4(address)
        if embedded:
            return all(is_public(ipv4) for ipv4 in embedded)
    # is_global alone lets multicast through, hence the explicit list.
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
    )


class Fetcher:
    """Fetches MTA-STS policies over HTTPS.

    ``resolver`` finds the addresses of the policy host. ``ca_file``: PEM file of trust anchors,
    default the system store. ``timeout``: the deadline for one fetch, from the first connection
    attempt to the last byte. ``connect_timeout``: for one TCP connection and TLS handshake.
    ``max_size``: the largest body accepted. ``allow_private_addresses``: allow loopback, private
    and other non-public addresses (for tests and closed networks). ``port``: of the HTTPS server.
    ``proxies``: a requests proxy map (``{"https": "http://proxy:3128"}``), keyed by scheme since
    the request URL names an address; the environment's proxies are never used.

    Raises ``ValueError`` for a CA file that cannot be read or limits that make no sense.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        ca_file: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_size: int = MAX_POLICY_SIZE,
        allow_private_addresses: bool = False,
        port: int = HTTPS_PORT,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError(
                f"timeouts must be positive (timeout {timeout}, connect {connect_timeout})"
            )
        if max_size < 0:
            raise ValueError(f"max_size must not be negative ({max_size})")
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535")
        self._resolver = resolver
        self._ca_data: str | None = None
        if ca_file is not None:
            try:
                with open(ca_file, encoding="ascii") as pem:
                    self._ca_data = pem.read()
                # Fail now, at configuration time, rather than on every fetch.
                ssl.create_default_context(cadata=self._ca_data)
            except (OSError, UnicodeDecodeError, ssl.SSLError) as exc:
                raise ValueError(f"CA file {ca_file}: {exc}") from exc
        self.ca_file = ca_file
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_size = max_size
        self.allow_private_addresses = allow_private_addresses
        self.port = port
        self._proxies = dict(proxies) if proxies else {}
        self._context = self._ssl_context()
        self._adapter = _PinnedHostAdapter(self._context)

    def url(self, host: str, path: str = POLICY_PATH) -> str:
        """The URL fetched for ``host``, as it appears in messages."""
        if self.port == HTTPS_PORT:
            return f"https://{host}{path}"
        return f"https://{host}:{self.port}{path}"

    def get(self, host: str, path: str = POLICY_PATH, *, ipv4: AddressOutcome = None) -> bytes:
        """Fetch ``https://host/path`` and return the body; raise ``FetchError`` (or its
        ``HTTPStatusError`` and ``CertificateError`` kinds) when no policy body came.

        ``ipv4``: the outcome of the host's A query when the caller already made it (the daemon
        asks on its event loop); otherwise the resolver is asked here.
        """
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        url = self.url(host, path)
        deadline = time.monotonic() + self.timeout
        failures: list[_ConnectFailed] = []
        refused: list[str] = []
        tried = False
        _deadline.value = deadline
        try:
            # IPv4 first; IPv6 is only looked up when no IPv4 address could be connected to.
            for family in self._resolver.address_families(host, ipv4):
                for address in self._allowed(url, family, refused):
                    tried = True
                    if time.monotonic() >= deadline:
                        raise FetchError(self._timed_out(url))
                    try:
                        return self._get_from(url, host, path, address, deadline)
                    except _ConnectFailed as exc:
                        # Only a failed TCP connection moves on to the next address: once a
                        # server has answered, its answer (a status, a certificate) is final.
                        failures.append(exc)
        except DNSFailure as exc:
            raise FetchError(f"{url}: {exc}") from exc
        finally:
            _deadline.value = math.inf
        if not tried:
            which = (
                f"address {refused[0]} is"
                if len(refused) == 1
                else f"addresses {', '.join(refused)} are"
            )
            raise FetchError(f"{url}: {which} not public (set allow_private_addresses to allow)")
        if time.monotonic() >= deadline:
            raise FetchError(self._timed_out(url))
        tried_text = ", ".join(str(failure) for failure in failures)
        raise FetchError(f"{url}: cannot connect to {tried_text}") from failures[-1].__cause__

    # -- steps of get() --------------------------------------------------------------------------

    def _allowed(self, url: str, found: Sequence[str], refused: list[str]) -> list[str]:
        """The addresses of ``found`` that may be connected to, in the resolver's order; the
        non-public ones are added to ``refused`` (a fetch is refused only when nothing is left)."""
        allowed: list[str] = []
        for text in found:
            try:
                address = ipaddress.ip_address(text)
            except ValueError as exc:
                raise FetchError(f"{url}: resolver returned {text!r}, not an address") from exc
            if self.allow_private_addresses or is_public(address):
                allowed.append(str(address))
            else:
                refused.append(str(address))
        return allowed

    def _ssl_context(self) -> _DeadlineSSLContext:
        # PROTOCOL_TLS_CLIENT: certificate and host name verification on.
        context = _DeadlineSSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8461 §3.3
        if self._ca_data is not None:
            context.load_verify_locations(cadata=self._ca_data)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return context

    def _timed_out(self, url: str) -> str:
        return f"{url}: timed out: no answer within {float(self.timeout)}s"

    def _get_from(self, url: str, host: str, path: str, address: str, deadline: float) -> bytes:
        netloc = f"[{address}]" if ":" in address else address
        host_header = host
        if self.port != HTTPS_PORT:
            netloc = f"{netloc}:{self.port}"
            host_header = f"{host}:{self.port}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(self._timed_out(url))
        request = requests.PreparedRequest()
        request.prepare(
            method="GET",
            url=f"https://{netloc}{path}",
            headers={
                "User-Agent": USER_AGENT,
                "Host": host_header,
                # The size limit applies to the bytes on the wire: no compression.
                "Accept-Encoding": "identity",
                "Accept": "text/plain, */*;q=0.1",
                "Connection": "close",
            },
        )
        try:
            # The adapter never follows a redirect (RFC 8461 §3.3) and reads nothing from the
            # environment (https_proxy, REQUESTS_CA_BUNDLE, .netrc): only what is passed here.
            response = self._adapter.send(
                request,
                stream=True,
                timeout=(min(self.connect_timeout, remaining), remaining),
                verify=True,
                proxies=self._proxies,
            )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            failure, cause = self._request_failed(url, address, exc, deadline)
            raise failure from cause
        try:
            self._check_response(url, response)
            return self._read_body(url, response, deadline)
        finally:
            response.close()

    def _request_failed(
        self, url: str, address: str, exc: Exception, deadline: float
    ) -> tuple[Exception, BaseException]:
        """The error a failed request is, and the most specific exception behind it (requests
        wraps urllib3's, which wraps the socket's or the TLS layer's) to chain it to."""
        local = local_cause(exc)
        if local is not None:
            # This machine could not make the request: nothing is known about the policy host.
            return LocalError(f"{url}: not fetched: {local.strerror or local}"), local
        verify_error = _find(exc, ssl.SSLCertVerificationError)
        if isinstance(verify_error, ssl.SSLCertVerificationError):
            reason = verify_error.verify_message or verify_error.reason or str(verify_error)
            return CertificateError(f"{url}: certificate verify failed: {reason}"), verify_error
        proxy_error = _find(exc, urllib3.exceptions.ProxyError)
        if proxy_error is not None:
            # Checked before connection errors: it wraps the failure to reach the proxy itself.
            return FetchError(f"{url}: proxy failed: {_plain_cause(proxy_error)}"), proxy_error
        connect_error = _find(exc, urllib3.exceptions.ConnectTimeoutError)
        if connect_error is not None:
            where = f"{address} port {self.port}"
            if isinstance(connect_error, urllib3.exceptions.NewConnectionError):
                return _ConnectFailed(where, _plain_cause(exc).lower()), connect_error
            if time.monotonic() < deadline:
                timed_out = f"timed out after {self.connect_timeout}s"
                return _ConnectFailed(where, timed_out), connect_error
        if time.monotonic() >= deadline or _find(exc, TimeoutError) is not None:
            if time.monotonic() >= deadline:
                return FetchError(self._timed_out(url)), exc
            # Only the TLS handshake runs under the connect timeout rather than the deadline.
            return FetchError(
                f"{url}: timed out: TLS handshake with {address} not done within "
                f"{float(self.connect_timeout)}s"
            ), exc
        ssl_error = _find(exc, ssl.SSLError)
        if ssl_error is not None:
            failed = f"{url}: TLS with {address} failed: {_plain_cause(ssl_error)}"
            return FetchError(failed), ssl_error
        return FetchError(f"{url}: {_plain_cause(exc)}"), exc

    def _check_response(self, url: str, response: requests.Response) -> None:
        status = response.status_code
        if 300 <= status < 400:
            # RFC 8461 §3.3: "HTTP 3xx redirects MUST NOT be followed".
            location = response.headers.get("Location")
            target = f" to {location}" if location else ""
            raise HTTPStatusError(f"{url}: redirect (HTTP {status}{target}) not followed", status)
        if status != 200:
            # RFC 8461 §3.3: only "200 OK" carries a policy.
            raise HTTPStatusError(f"{url}: HTTP {status}", status)
        # RFC 8461 §3.3: the media type SHOULD be checked to be text/plain (parameters allowed).
        content_type = response.headers.get("Content-Type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "text/plain":
            found = f"media type {media_type}" if media_type else "no media type"
            raise FetchError(f"{url}: {found}, expected text/plain")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchError(f"{url}: content encoding {encoding} was not asked for")
        length = response.headers.get("Content-Length", "").strip()
        if length.isascii() and length.isdigit() and int(length) > self.max_size:
            # Refuse before reading a byte of a body announced as too large.
            raise FetchError(f"{url}: policy larger than {self.max_size} bytes")

    def _read_body(self, url: str, response: requests.Response, deadline: float) -> bytes:
        raw: urllib3.response.BaseHTTPResponse = response.raw
        chunks: list[bytes] = []
        received = 0
        while True:
            if time.monotonic() >= deadline:
                raise FetchError(
                    f"{url}: timed out: policy incomplete after {float(self.timeout)}s "
                    f"({received} bytes received)"
                )
            # Ask for no more than one byte past the limit: that byte is enough to know. read1
            # returns what one read brought, so the clock and the limit are checked as bytes come.
            wanted = min(_CHUNK_SIZE, self.max_size + 1 - received)
            try:
                chunk = raw.read1(wanted, decode_content=False)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                local = local_cause(exc)
                if local is not None:
                    raise LocalError(f"{url}: not fetched: {local.strerror or local}") from exc
                if time.monotonic() >= deadline or _find(exc, TimeoutError) is not None:
                    raise FetchError(
                        f"{url}: timed out: policy incomplete after {float(self.timeout)}s "
                        f"({received} bytes received)"
                    ) from exc
                raise FetchError(f"{url}: body not received: {_plain_cause(exc)}") from exc
            if not chunk:
                return b"".join(chunks)
            received += len(chunk)
            if received > self.max_size:
                raise FetchError(f"{url}: policy larger than {self.max_size} bytes")
            chunks.append(chunk)
