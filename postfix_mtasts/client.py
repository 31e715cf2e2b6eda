"""A socketmap client, like netcat for Postfix's protocol: ``postfix-mtasts query --socketmap``.

Sends each key as ``NAME key`` in a netstring over one connection, one request at a time as Postfix
does, and prints each raw reply payload. Exit status as ``postmap -q``: 0 when a key was found
(``OK``), 1 when none was; a ``TEMP``, ``TIMEOUT`` or ``PERM`` reply, a malformed reply or a
connection failure prints an error on standard error and makes the status 1 as well, like
``postmap``'s "query error".
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterable

from postfix_mtasts import netstring
from postfix_mtasts.listeners import ListenerError, UnixListener, parse_endpoint

# Postfix waits this long to connect, send or receive (socketmap_table(5)).
TIMEOUT = 100.0


def one_line(text: str, limit: int) -> str:
    """What another program said (a daemon's answer, a tool's error), fit for one line of a
    report: a Python literal when it holds a control character, at most ``limit`` characters."""
    text = text.strip()
    line = text if text.isprintable() else repr(text)
    return line if len(line) <= limit else line[: limit - 3] + "..."


class ClientError(Exception):
    pass


def connect(endpoint: str, timeout: float = TIMEOUT) -> socket.socket:
    """Connect to ``inet:HOST:PORT``, ``inet:[V6]:PORT`` or ``unix:PATH``, the notation of
    Postfix's ``socketmap:`` tables (parsed as the daemon parses its listeners)."""
    try:
        where = parse_endpoint(endpoint)
    except ListenerError as exc:
        raise ClientError(str(exc)) from None
    try:
        if isinstance(where, UnixListener):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(where.path)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection((where.host, where.port), timeout=timeout)
    except OSError as exc:
        raise ClientError(f"{endpoint}: cannot connect: {exc.strerror or exc}") from exc


class Client:
    """One persistent socketmap connection."""

    def __init__(self, endpoint: str, timeout: float = TIMEOUT) -> None:
        self.endpoint = endpoint
        self._sock = connect(endpoint, timeout)
        self._decoder = netstring.Decoder(max_length=netstring.MAX_REPLY)
        self._replies: list[bytes] = []

    def request(self, name: str, key: str, *, deadline: float | None = None) -> str:
        """Send one request and return the raw reply payload. ``deadline`` (``time.monotonic()``)
        bounds sending and waiting for the reply together; without it each step may take the
        timeout the client was made with. A ClientError caused by a ``TimeoutError`` means no
        reply came in time."""
        payload = f"{name} {key}".encode()
        if len(payload) > netstring.MAX_QUERY:
            raise ClientError(f"request of {len(payload)} bytes exceeds {netstring.MAX_QUERY}")
        try:
            self._before(deadline)
            self._sock.sendall(netstring.encode(payload))
            while not self._replies:
                self._before(deadline)
                data = self._sock.recv(65536)
                if not data:
                    raise ClientError(f"{self.endpoint}: connection closed without a reply")
                self._replies.extend(self._decoder.feed(data))
        except OSError as exc:
            raise ClientError(f"{self.endpoint}: {exc.strerror or exc}") from exc
        except netstring.NetstringError as exc:
            raise ClientError(f"{self.endpoint}: malformed reply: {exc}") from exc
        reply = self._replies.pop(0)
        try:
            return reply.decode()
        except UnicodeDecodeError as exc:
            raise ClientError(f"{self.endpoint}: reply is not UTF-8") from exc

    def _before(self, deadline: float | None) -> None:
        """Give the next step on the socket what is left of ``deadline``."""
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(left)

    def close(self) -> None:
        self._sock.close()


def run(endpoint: str, name: str, keys: Iterable[str]) -> int:
    """Ask the daemon for each key and print the raw replies; return the exit status."""
    try:
        client = Client(endpoint)
    except ClientError as exc:
        print(f"postfix-mtasts query: {exc}", file=sys.stderr)
        return 1
    found = False
    failed = False
    try:
        for key in keys:
            if not key:
                continue
            try:
                reply = client.request(name, key)
            except ClientError as exc:
                print(f"postfix-mtasts query: {key}: {exc}", file=sys.stderr)
                return 1
            print(reply, flush=True)
            status = reply.partition(" ")[0]
            if status == "OK":
                found = True
            elif status != "NOTFOUND":
                print(f"postfix-mtasts query: {key}: query error: {reply}", file=sys.stderr)
                failed = True
    finally:
        client.close()
    return 0 if found and not failed else 1
