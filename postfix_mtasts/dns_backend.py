"""dnspython's asyncio backend, with a UDP socket that waits on the event loop's readiness.

Kept because it is measurably cheaper on the cold path (benchmarks/README.md, issue 11):
dnspython's own asyncio backend gives each UDP question a datagram transport, a protocol, a queue
and a task per wait, and the daemon asks two questions per new domain on its one event loop.
Everything else stays dnspython's: the resolver builds the query, sends it through this socket,
matches the reply to the question (``Message.is_response``, the source address), retries other
nameservers and falls back to TCP (with dnspython's own stream sockets). The socket is plugged in
through dnspython's documented extension point, the ``backend`` of ``dns.asyncresolver``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import dns.asyncbackend
import dns.exception

__all__ = ["LoopBackend"]

_AsyncioBackend: Any = type(dns.asyncbackend.get_backend("asyncio"))
# dnspython's base class for a backend's UDP socket (dns.asyncbackend re-exports it untyped).
_DatagramSocket: Any = dns.asyncbackend.DatagramSocket  # type: ignore[attr-defined]


class _Datagram(_DatagramSocket):  # type: ignore[misc]
    """One question's non-blocking UDP socket (a fresh one per question: a fresh source port)."""

    def __init__(self, sock: socket.socket, connected: bool) -> None:
        super().__init__(sock.family, socket.SOCK_DGRAM)
        self._sock = sock
        self._connected = connected

    async def sendto(self, what: bytes, destination: Any, timeout: float | None) -> int:
        try:
            if self._connected or destination is None:
                return self._sock.send(what)
            return self._sock.sendto(what, destination)
        except BlockingIOError:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_sendto(self._sock, what, destination), timeout)
            return len(what)

    async def recvfrom(self, size: int, timeout: float | None) -> tuple[bytes, Any]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        fd = self._sock.fileno()
        while True:
            try:
                return self._sock.recvfrom(size)
            except BlockingIOError:
                pass
            if deadline is not None and loop.time() >= deadline:
                raise dns.exception.Timeout(timeout=timeout)  # type: ignore[no-untyped-call]
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _settle, readable)
            timer = None if deadline is None else loop.call_at(deadline, _settle, readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
                if timer is not None:
                    timer.cancel()

    async def close(self) -> None:
        self._sock.close()

    async def getpeername(self) -> Any:
        return self._sock.getpeername()

    async def getsockname(self) -> Any:
        return self._sock.getsockname()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class LoopBackend(_AsyncioBackend):  # type: ignore[misc]
    """dnspython's asyncio backend; UDP sockets are :class:`_Datagram`, the rest is its own."""

    def datagram_connection_required(self) -> bool:
        # Connected to the nameserver: the kernel drops datagrams from any other address and
        # port before dnspython looks at them (RFC 5452 §9.1 asks for the source to be checked).
        return True

    async def make_socket(
        self,
        af: int,
        socktype: int,
        proto: int = 0,
        source: Any = None,
        destination: Any = None,
        timeout: float | None = None,
        ssl_context: Any = None,
        server_hostname: str | None = None,
    ) -> Any:
        if socktype != socket.SOCK_DGRAM:
            return await super().make_socket(
                af, socktype, proto, source, destination, timeout, ssl_context, server_hostname
            )
        sock = socket.socket(af, socket.SOCK_DGRAM, proto)
        try:
            sock.setblocking(False)
            if source is not None:
                sock.bind(source)
            if destination is not None:
                sock.connect(destination)
        except BaseException:
            sock.close()
            raise
        return _Datagram(sock, destination is not None)
