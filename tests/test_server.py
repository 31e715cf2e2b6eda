"""The socketmap server over real sockets on loopback (inet and unix)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from postfix_mtasts import postfix
from postfix_mtasts import server as server_module
from postfix_mtasts.config import Config, Profile
from postfix_mtasts.listeners import (
    InetListener,
    Listener,
    ListenerError,
    SystemdListener,
    UnixListener,
    _adopt_systemd,
    parse_listener,
    systemd_fds,
)
from postfix_mtasts.netstring import MAX_REPLY, Decoder, encode, encode_reply
from postfix_mtasts.policydb import Decision
from postfix_mtasts.responder import Responder
from postfix_mtasts.server import Server

REPO = Path(__file__).resolve().parents[1]
# RFC 8461 §3.2, the example policy.
RFC_EXAMPLE_POLICY = (
    "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\n"
    "mx: backupmx.example.com\nmax_age: 604800\n"
)
# Generous bound for anything that should happen; never an assertion about speed.
PATIENCE = 10.0


def aio(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function on a fresh event loop."""

    async def body(*args: Any, **kwargs: Any) -> None:
        try:
            await asyncio.wait_for(test(*args, **kwargs), 60)
        finally:
            while _clients:
                _clients.pop().writer.close()
            await asyncio.sleep(0)

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(body(*args, **kwargs))

    return run


class FakeResponder:
    """Our own responder interface, answering by key with framed replies (bytes).

    ``slow...``: a future the test resolves (``resolve``); ``fail``: a future that raises;
    ``raise``: raises at once; ``nf``: ``NOTFOUND``; ``framed``: ``OK framed``; anything else:
    ``OK secure match=<key>`` at once (the cached fast path).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.futures: dict[str, asyncio.Future[bytes]] = {}

    def lookup(self, name: str, key: str) -> bytes | asyncio.Future[bytes]:
        self.calls.append((name, key))
        if key.startswith("slow"):
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self.futures[key] = future
            return future
        if key == "fail":
            future = asyncio.get_running_loop().create_future()
            future.set_exception(OSError("resolver exploded"))
            return future
        if key == "raise":
            raise RuntimeError("bug in the responder")
        if key == "nf":
            return encode_reply("NOTFOUND ")
        if key == "framed":
            return encode_reply("OK framed")
        return encode_reply(f"OK secure match={key}")

    def resolve(self, key: str, reply: str | bytes | None = None) -> None:
        if reply is None:
            reply = f"OK later {key}"
        self.futures[key].set_result(encode_reply(reply) if isinstance(reply, str) else reply)

    async def wait_for_call(self, key: str) -> None:
        await wait_until(lambda: any(k == key for _, k in self.calls))


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(PATIENCE):
        while not condition():
            await asyncio.sleep(0.01)


_clients: list[Client] = []


class Client:
    """A socketmap client speaking through asyncio streams; closed when its test ends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = Decoder(MAX_REPLY)
        self.replies: list[bytes] = []
        _clients.append(self)

    @classmethod
    async def inet(cls, server: Server, index: int = 0) -> Client:
        host, port = server.sockets[index].getsockname()[:2]
        return await cls.inet_address(host, port)

    @classmethod
    async def inet_address(cls, host: str, port: int) -> Client:
        return cls(*await asyncio.open_connection(host, port))

    @classmethod
    async def unix(cls, path: str) -> Client:
        return cls(*await asyncio.open_unix_connection(path))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, *keys: str, name: str = "postfix") -> None:
        await self.send_raw(b"".join(encode(f"{name} {key}".encode()) for key in keys))

    async def reply(self) -> str:
        async with asyncio.timeout(PATIENCE):
            while not self.replies:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("connection closed")
                self.replies.extend(self.decoder.feed(data))
        return self.replies.pop(0).decode()

    async def ask(self, key: str, name: str = "postfix") -> str:
        await self.send(key, name=name)
        return await self.reply()

    async def closed_by_server(self) -> bool:
        """Wait for EOF; True if the server closed the connection (without more replies)."""
        try:
            async with asyncio.timeout(PATIENCE):
                data = await self.reader.read(65536)
        except ConnectionResetError:
            return True
        return data == b""

    async def no_reply_yet(self, wait: float = 0.2) -> bool:
        try:
            async with asyncio.timeout(wait):
                await self.reply()
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def serving(
    responder: FakeResponder | None = None,
    listeners: tuple[str | Listener, ...] = ("inet:127.0.0.1:0",),
    **options: Any,
) -> AsyncIterator[Server]:
    server = Server(responder or FakeResponder(), listeners, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_timeout=0.5)


# --- requests and replies --------------------------------------------------------------------


@aio
async def test_many_requests_on_one_connection_are_answered() -> None:
    async with serving() as server:
        client = await Client.inet(server)
        for i in range(500):
            assert await client.ask(f"{i}.example") == f"OK secure match={i}.example"
        assert await client.ask("nf") == "NOTFOUND "
        client.close()
        assert server.requests == 501
        assert server.deferred == 0


@aio
async def test_partial_frames_of_two_connections_stay_apart() -> None:
    # Two clients each send 6000 requests in writes that end mid-frame and alternate between
    # them: each connection's decoder keeps its own partial frame.
    async with serving() as server:
        clients = [await Client.inet(server) for _ in range(2)]
        count = 6000
        streams = [
            b"".join(encode(f"postfix c{n}-{i}.example".encode()) for i in range(count))
            for n in range(2)
        ]
        piece = 7919  # a prime: the cuts fall inside frames, at different places on each
        for start in range(0, max(map(len, streams)), piece):
            for client, stream in zip(clients, streams, strict=True):
                client.writer.write(stream[start : start + piece])
            await asyncio.gather(*(client.writer.drain() for client in clients))
        for n, client in enumerate(clients):
            for i in range(count):
                assert await client.reply() == f"OK secure match=c{n}-{i}.example"
            client.close()
        assert server.requests == 2 * count


@aio
async def test_map_name_and_key_reach_the_responder() -> None:
    responder = FakeResponder()
    async with serving(responder) as server:
        client = await Client.inet(server)
        await client.ask("[mx.example.org]:587", name="tlsrpt")
        await client.ask("bücher.example")
        client.close()
    assert responder.calls == [("tlsrpt", "[mx.example.org]:587"), ("postfix", "bücher.example")]


@aio
async def test_deferred_reply_is_written_when_its_future_resolves() -> None:
    responder = FakeResponder()
    async with serving(responder) as server:
        client = await Client.inet(server)
        await client.send("slow1")
        await responder.wait_for_call("slow1")
        assert await client.no_reply_yet()
        responder.resolve("slow1", "OK secure match=mx.example.net")
        assert await client.reply() == "OK secure match=mx.example.net"
        assert server.deferred == 1
        client.close()


@aio
async def test_reply_framed_by_the_responder_is_sent_as_it_is() -> None:
    responder = FakeResponder()
    async with serving(responder) as server:
        client = await Client.inet(server)
        assert await client.ask("framed") == "OK framed"
        await client.send("slow1")
        await responder.wait_for_call("slow1")
        responder.resolve("slow1", encode_reply("OK secure match=mx.example.net"))
        assert await client.reply() == "OK secure match=mx.example.net"
        assert server.lookup_errors == 0
        client.close()


@aio
async def test_pipelined_replies_keep_request_order_behind_a_slow_lookup() -> None:
    responder = FakeResponder()
    async with serving(responder) as server:
        client = await Client.inet(server)
        await client.send("slow1", "fast1", "slow2", "fast2")
        await responder.wait_for_call("fast2")
        # The second slow one finishes first; nothing may overtake the first slow one.
        responder.resolve("slow2")
        assert await client.no_reply_yet()
        responder.resolve("slow1")
        assert [await client.reply() for _ in range(4)] == [
            "OK later slow1",
            "OK secure match=fast1",
            "OK later slow2",
            "OK secure match=fast2",
        ]
        # Back to the fast path once the queue is empty.
        assert await client.ask("fast3") == "OK secure match=fast3"
        client.close()


@aio
async def test_hanging_lookup_on_one_connection_does_not_delay_another() -> None:
    responder = FakeResponder()
    async with serving(responder, request_timeout=30.0) as server:
        stuck = await Client.inet(server)
        await stuck.send("slow-hang")
        await responder.wait_for_call("slow-hang")
        other = await Client.inet(server)
        for i in range(50):
            assert await other.ask(f"{i}.example") == f"OK secure match={i}.example"
        assert await stuck.no_reply_yet(0.05)
        stuck.close()
        other.close()


@aio
async def test_many_connections_waiting_on_one_shared_future_all_get_the_reply() -> None:
    loop = asyncio.get_running_loop()
    shared: asyncio.Future[bytes] = loop.create_future()

    class Shared(FakeResponder):
        def lookup(self, name: str, key: str) -> bytes | asyncio.Future[bytes]:
            self.calls.append((name, key))
            return shared

    responder = Shared()
    async with serving(responder) as server:
        clients = [await Client.inet(server) for _ in range(10)]
        for client in clients:
            await client.send("example.com")
        await wait_until(lambda: len(responder.calls) == 10)
        shared.set_result(encode_reply("OK secure match=mx.example.com"))
        for client in clients:
            assert await client.reply() == "OK secure match=mx.example.com"
            client.close()


@aio
async def test_failed_lookup_is_answered_temp() -> None:
    async with serving() as server:
        client = await Client.inet(server)
        assert await client.ask("fail") == "TEMP lookup failed: resolver exploded"
        assert await client.ask("raise") == "TEMP lookup failed"
        assert await client.ask("ok.example") == "OK secure match=ok.example"
        assert server.lookup_errors == 2
        client.close()


@aio
async def test_lookup_that_does_not_finish_in_time_is_answered_temp() -> None:
    responder = FakeResponder()
    async with serving(responder, request_timeout=0.2) as server:
        client = await Client.inet(server)
        assert await client.ask("slow-hang") == "TEMP lookup timed out after 0.2s"
        assert server.lookup_timeouts == 1
        # A late result is not written twice.
        responder.resolve("slow-hang")
        assert await client.ask("next.example") == "OK secure match=next.example"
        client.close()


class Decisions:
    """The policy cache as the responder sees it, with one ready decision per domain."""

    def __init__(self, *decisions: Decision) -> None:
        self.decisions = {decision.domain: decision for decision in decisions}
        self.kept: dict[tuple[str, str], bytes] = {}
        self.size = len(self.decisions)

    def lookup(self, domain: str) -> Decision:
        return self.decisions[domain]

    def recall(self, name: str, domain: str) -> bytes | None:
        return self.kept.get((name, domain))

    def remember(self, decision: Decision, name: str, reply: bytes) -> None:
        self.kept[(name, decision.domain)] = reply


@aio
async def test_reply_that_postfix_must_not_see_becomes_temp(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Replies are framed by the responder: over Postfix's size limit (thousands of mx lines, each
    # repeated as a TLSRPT attribute), or an OK with no data, it answers TEMP and says why.
    text = (
        "version: STSv1\nmode: enforce\n"
        + "".join(f"mx: mx{i:05}.example.net\n" for i in range(2000))
        + "max_age: 86400\n"
    )
    decisions = Decisions(
        Decision("huge.example", policy_text=text),
        Decision("empty.example", policy_text=RFC_EXAMPLE_POLICY),
    )
    real_policy_reply = postfix.policy_reply

    def policy_reply(*args: Any) -> str:
        return "OK " if args[2] == "empty.example" else real_policy_reply(*args)

    monkeypatch.setattr(postfix, "policy_reply", policy_reply)
    responder = Responder(Config(policy=Profile(tlsrpt=True)), cast(Any, decisions))
    async with serving(cast(Any, responder)) as server:
        client = await Client.inet(server)
        with caplog.at_level(logging.ERROR):
            assert await client.ask("huge.example") == "TEMP internal error"
            assert await client.ask("empty.example") == "TEMP internal error"
            # Not remembered: refused again.
            assert await client.ask("huge.example") == "TEMP internal error"
        client.close()
    refusals = [r.getMessage() for r in caplog.records if "invalid reply" in r.getMessage()]
    assert len(refusals) == 3
    assert refusals[0].startswith("huge.example: invalid reply from the responder (map postfix)")
    assert refusals[1].startswith("empty.example: invalid reply from the responder (map postfix)")


@aio
async def test_bad_payload_is_answered_perm_and_the_connection_stays() -> None:
    responder = FakeResponder()
    async with serving(responder) as server:
        client = await Client.inet(server)
        for payload, reason in [
            (b"postfix", "PERM request is not 'NAME key'"),
            (b" example.com", "PERM request has an empty map name"),
            (b"postfix ", "PERM request has an empty key"),
            (b"postfix exa\xffmple.com", "PERM request is not valid UTF-8"),
            (b"postfix exa\x00mple.com", "PERM request contains a control character"),
        ]:
            await client.send_raw(encode(payload))
            assert await client.reply() == reason
        assert await client.ask("good.example") == "OK secure match=good.example"
        assert server.bad_requests == 5
        client.close()
    assert responder.calls == [("postfix", "good.example")]


@aio
async def test_perm_reply_keeps_its_place_in_the_pipeline() -> None:
    responder = FakeResponder()
    async with serving(responder) as server:
        client = await Client.inet(server)
        await client.send_raw(encode(b"postfix slow1") + encode(b"postfix") + encode(b"x y"))
        await responder.wait_for_call("y")
        responder.resolve("slow1")
        assert [await client.reply() for _ in range(3)] == [
            "OK later slow1",
            "PERM request is not 'NAME key'",
            "OK secure match=y",
        ]
        client.close()


@pytest.mark.parametrize(
    "stream",
    [
        b"abc",
        b"3:abcX",
        b"01:a,",
        b"-1:,",
        b" 19:postfix example.com,",
        b"19:postfix example.com;",
        b"10001:",
        b"99999999999",
        b"19:postfix example.com,garbage",
    ],
)
@aio
async def test_framing_error_closes_the_connection(stream: bytes) -> None:
    responder = FakeResponder()
    async with serving(responder) as server:
        client = await Client.inet(server)
        await client.send_raw(stream)
        assert await client.closed_by_server()
        assert server.framing_errors == 1
        # Other connections are not affected.
        other = await Client.inet(server)
        assert await other.ask("x.example") == "OK secure match=x.example"
        other.close()
    assert responder.calls == [("postfix", "x.example")]


@aio
async def test_framing_error_after_good_requests_closes_the_connection() -> None:
    async with serving() as server:
        client = await Client.inet(server)
        assert await client.ask("a.example") == "OK secure match=a.example"
        await client.send_raw(b"x")
        assert await client.closed_by_server()


@aio
async def test_replies_are_delivered_after_the_client_half_closes() -> None:
    responder = FakeResponder()
    async with serving(responder) as server:
        client = await Client.inet(server)
        await client.send("slow1", "b.example")
        client.writer.write_eof()
        await responder.wait_for_call("b.example")
        responder.resolve("slow1")
        assert await client.reply() == "OK later slow1"
        assert await client.reply() == "OK secure match=b.example"
        assert await client.closed_by_server()


@aio
async def test_pipelining_limit_pauses_reading_without_losing_requests() -> None:
    responder = FakeResponder()
    async with serving(responder, max_pipelined=2) as server:
        client = await Client.inet(server)
        keys = [f"slow{i}" for i in range(8)]
        for key in keys:
            await client.send(key)
        answered: list[str] = []
        resolved = 0
        while resolved < len(keys):
            await wait_until(lambda: any(not f.done() for f in responder.futures.values()))
            for key, future in list(responder.futures.items()):
                if not future.done():
                    responder.resolve(key)
                    resolved += 1
            while len(answered) < resolved:
                answered.append(await client.reply())
        assert answered == [f"OK later {key}" for key in keys]
        client.close()


class Gated(FakeResponder):
    """Every lookup is a future (a new domain), held until `release`; afterwards resolved at
    once. Counts the lookups in flight and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.released = False
        self.held: list[tuple[str, asyncio.Future[bytes]]] = []
        self.in_flight = 0
        self.peak = 0

    def lookup(self, name: str, key: str) -> asyncio.Future[bytes]:
        self.calls.append((name, key))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        future.add_done_callback(self._finished)
        if self.released:
            loop.call_soon(future.set_result, encode_reply(f"OK later {key}"))
        else:
            self.held.append((key, future))
        return future

    def _finished(self, _: object) -> None:
        self.in_flight -= 1

    def release(self) -> None:
        self.released = True
        for key, future in self.held:
            future.set_result(encode_reply(f"OK later {key}"))
        self.held.clear()


@aio
async def test_one_write_of_many_new_domains_starts_at_most_max_pipelined_lookups() -> None:
    responder = Gated()
    async with serving(responder, max_pipelined=10, request_timeout=60.0) as server:
        client = await Client.inet(server)
        keys = [f"new{i}.example" for i in range(5000)]
        await client.send(*keys)
        await wait_until(lambda: len(responder.calls) >= 10)
        await asyncio.sleep(0.3)
        assert len(responder.calls) == 10
        responder.release()
        replies = [await client.reply() for _ in keys]
        assert replies == [f"OK later {key}" for key in keys]
        assert responder.peak <= 10
        assert server.requests == 5000
        client.close()


@aio
async def test_client_that_floods_without_reading_and_resets_costs_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The root logger: asyncio's own warnings count too.
    caplog.set_level(logging.DEBUG)
    async with serving() as server:
        host, port = server.sockets[0].getsockname()[:2]
        flood = b"".join(encode(f"postfix flood-{i:06d}.example".encode()) for i in range(40000))
        peers = []
        for _ in range(3):
            sock = socket.create_connection((host, port))
            peers.append("{}:{}".format(*sock.getsockname()[:2]))
            sock.setblocking(False)
            # What the kernel takes at once, without letting the server read in between; then a
            # reset: the server reads the flood after the client is gone.
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while sent < len(flood):
                    sent += sock.send(flood[sent : sent + 65536])
            assert sent > 65536
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        other = await Client.inet(server)
        async with asyncio.timeout(2.0):
            assert await other.ask("after.example") == "OK secure match=after.example"
        await wait_until(lambda: server.connections == 1)
        other.close()
    noise = [r.getMessage() for r in caplog.records if "socket.send() raised" in r.getMessage()]
    assert noise == []
    for peer in peers:
        lines = [r.getMessage() for r in caplog.records if peer in r.getMessage()]
        assert len(lines) <= 2, lines
    # And none goes unnamed: a client that has reset has no peer name any more.
    clients = [r.getMessage() for r in caplog.records if "socketmap client" in r.getMessage()]
    assert len(clients) <= 2 * len(peers), clients


@aio
async def test_replies_wait_while_the_client_does_not_read_and_nothing_is_lost() -> None:
    responder = FakeResponder()
    async with serving(responder, max_pipelined=10) as server:
        host, port = server.sockets[0].getsockname()[:2]
        # Accepted sockets inherit a fixed, small send buffer: the kernel takes few replies.
        server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        keys = [f"r{i:06d}.example" for i in range(60000)]
        sock = socket.socket()
        # A small window: the server's replies back up soon, as with a client that does not read.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, port))
        sock.setblocking(False)
        flood = b"".join(encode(f"postfix {key}".encode()) for key in keys)
        sent = 0
        # Send without reading until the server stops taking requests (its replies are unread).
        async with asyncio.timeout(PATIENCE):
            while sent < len(flood):
                try:
                    sent += sock.send(flood[sent : sent + 65536])
                except BlockingIOError:
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        answered = len(responder.calls)
        assert answered < len(keys)
        await asyncio.sleep(0.2)
        assert len(responder.calls) == answered
        # Now read: every request is answered, in order.
        reader, writer = await asyncio.open_connection(sock=sock)
        decoder = Decoder(MAX_REPLY)
        replies: list[bytes] = []
        async with asyncio.timeout(PATIENCE * 3):
            while len(replies) < len(keys):
                if sent < len(flood):
                    writer.write(flood[sent : sent + 65536])
                    sent = min(len(flood), sent + 65536)
                data = await reader.read(65536)
                assert data
                replies.extend(decoder.feed(data))
        assert replies == [f"OK secure match={key}".encode() for key in keys]
        writer.close()


class CountingResponder:
    """Answers every key NOTFOUND at once and only counts: it keeps nothing per request."""

    def __init__(self) -> None:
        self.answered = 0

    def lookup(self, name: str, key: str) -> bytes:
        self.answered += 1
        return encode(b"NOTFOUND ")


@aio
async def test_requests_waiting_for_a_client_that_does_not_read_are_kept_as_bytes() -> None:
    # Tiny requests, one write of 240 KB per client, and no client reads its replies: what the
    # server holds meanwhile is the bytes that came (and at most a batch decoded), not tens of
    # thousands of objects (about 1 MB per client before).
    responder = CountingResponder()
    clients = 4
    flood = encode(b"postfix a") * 20000
    async with serving(responder, max_pipelined=100) as server:
        host, port = server.sockets[0].getsockname()[:2]
        server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        socks = []
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(clients):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((host, port))
                sock.setblocking(False)
                sent = 0
                with contextlib.suppress(BlockingIOError):
                    while sent < len(flood):
                        sent += sock.send(memoryview(flood)[sent:])
                socks.append(sock)
            await asyncio.sleep(1.0)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            for sock in socks:
                sock.close()
        assert responder.answered < clients * 20000, "the clients' replies were not held back"
    assert held < clients * 300_000, f"{held} bytes held for {clients} clients"


# --- timeouts ----------------------------------------------------------------------------------


@aio
async def test_idle_connection_is_closed() -> None:
    async with serving(idle_timeout=0.2) as server:
        client = await Client.inet(server)
        assert await client.ask("a.example") == "OK secure match=a.example"
        assert await client.closed_by_server()
        assert server.idle_timeouts == 1
        await wait_until(lambda: server.connections == 0)


@aio
async def test_connection_with_a_request_in_flight_is_not_idle() -> None:
    async with serving(idle_timeout=0.1, request_timeout=0.5) as server:
        client = await Client.inet(server)
        assert await client.ask("slow-hang") == "TEMP lookup timed out after 0.5s"
        assert server.idle_timeouts == 0
        assert await client.closed_by_server()
        assert server.idle_timeouts == 1


@aio
async def test_request_that_does_not_complete_in_time_closes_the_connection() -> None:
    responder = FakeResponder()
    async with serving(responder, idle_timeout=60.0, frame_timeout=0.2) as server:
        client = await Client.inet(server)
        await client.send_raw(b"19:postfix exa")
        assert await client.closed_by_server()
        assert server.frame_timeouts == 1
    assert responder.calls == []


@aio
async def test_closed_connection_whose_client_does_not_read_is_aborted_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_module, "_CLOSE_LINGER", 0.3, raising=False)
    async with serving(idle_timeout=0.3) as server:
        host, port = server.sockets[0].getsockname()[:2]
        server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, port))
        sock.setblocking(False)
        flood = b"".join(encode(f"postfix u{i:06d}.example".encode()) for i in range(20000))
        with contextlib.suppress(BlockingIOError):
            sock.send(flood)
        # Idle, with replies it never reads: closed, and since close() would wait for the client
        # forever, aborted soon after.
        await wait_until(lambda: server.idle_timeouts == 1)
        await wait_until(lambda: server.connections == 0)
        sock.close()


@aio
async def test_request_cut_short_while_the_pipeline_is_full_is_not_timed_out() -> None:
    responder = FakeResponder()
    async with serving(responder, max_pipelined=2, frame_timeout=0.2) as server:
        client = await Client.inet(server)
        # Reading pauses with the pipeline full: the rest of the third request cannot arrive.
        await client.send_raw(
            encode(b"postfix slow1") + encode(b"postfix slow2") + b"19:postfix exa"
        )
        await responder.wait_for_call("slow2")
        await asyncio.sleep(0.5)
        assert server.frame_timeouts == 0
        responder.resolve("slow1")
        responder.resolve("slow2")
        assert await client.reply() == "OK later slow1"
        assert await client.reply() == "OK later slow2"
        await client.send_raw(b"mple.com,")
        assert await client.reply() == "OK secure match=example.com"
        client.close()


# --- connection limit ---------------------------------------------------------------------------


def _peer_of(client: Client) -> str:
    """How the server's log names this client: its address and port as the server sees them."""
    host, port = client.writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


def server_side_sockets(server: Server) -> int:
    """Descriptors of this process that are connections accepted by `server` (Linux /proc)."""
    port = server.sockets[0].getsockname()[1]
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                # State 0A is LISTEN: the listening socket is not a connection.
                if local_port == port and fields[3] != "0A":
                    inodes.add(fields[9])
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
    return count


@aio
async def test_at_the_cap_the_least_recently_active_idle_connection_makes_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="postfix_mtasts.server")
    async with serving(max_connections=3) as server:
        clients = [await Client.inet(server) for _ in range(3)]
        # Last activity in the order 1, 0, 2: client 1 has been quiet the longest.
        for i in (1, 0, 2):
            assert await clients[i].ask(f"{i}.example") == f"OK secure match={i}.example"
            await asyncio.sleep(0.02)
        newcomer = await Client.inet(server)
        assert await newcomer.ask("new.example") == "OK secure match=new.example"
        assert await clients[1].closed_by_server()
        for i in (0, 2):
            assert await clients[i].ask(f"{i}.example") == f"OK secure match={i}.example"
        assert server.connections == 3
        assert server.connections_accepted == 4
    lines = [r for r in caplog.records if _peer_of(clients[1]) in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.INFO
    assert "quiet for" in lines[0].getMessage()


@aio
async def test_at_the_cap_a_connection_waiting_for_a_lookup_makes_room_only_when_all_do() -> None:
    responder = FakeResponder()
    async with serving(responder, max_connections=2, request_timeout=60.0) as server:
        busy = await Client.inet(server)
        await busy.send("slow-busy")
        await responder.wait_for_call("slow-busy")
        idle = await Client.inet(server)
        assert await idle.ask("idle.example") == "OK secure match=idle.example"
        # `busy` has been quiet longer, but it waits for its answer: `idle` makes room.
        second = await Client.inet(server)
        assert await second.ask("second.example") == "OK secure match=second.example"
        assert await idle.closed_by_server()
        assert await busy.no_reply_yet(0.05)
        # Every connection waits for a lookup now: the least recently active one goes.
        await second.send("slow-second")
        await responder.wait_for_call("slow-second")
        third = await Client.inet(server)
        assert await third.ask("third.example") == "OK secure match=third.example"
        assert await busy.closed_by_server()
        # Its lookup may be shared with other askers: never cancelled.
        assert not responder.futures["slow-busy"].done()
        responder.resolve("slow-second")
        assert await second.reply() == "OK later slow-second"
        assert server.connections == 2


@aio
async def test_clients_beyond_the_cap_are_served_and_descriptors_stay_bounded() -> None:
    cap = 5
    async with serving(max_connections=cap) as server:
        peak = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, server_side_sockets(server), server.connections)
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        # One at a time: each newcomer is answered at once, by closing an older connection.
        for i in range(3 * cap):
            client = await Client.inet(server)
            assert await client.ask(f"{i}.example") == f"OK secure match={i}.example"
        # All at once: each is accepted (and may be closed again by a later newcomer).
        crowd = await asyncio.gather(*(Client.inet(server) for _ in range(40)))
        for client in crowd:
            await client.send("crowd.example")
        await wait_until(lambda: server.connections_accepted == 3 * cap + 40)
        last = await Client.inet(server)
        assert await last.ask("last.example") == "OK secure match=last.example"
        sampling = False
        await sampler
        assert server.connections <= cap
        assert server_side_sockets(server) <= cap
        # At most the cap plus the few connections being closed to make room (the server closes
        # at most 8 at a time).
        assert peak <= cap + 8, peak


# --- graceful stop -----------------------------------------------------------------------------


@aio
async def test_stop_finishes_requests_in_flight_and_closes_idle_connections() -> None:
    responder = FakeResponder()
    server = Server(responder, ["inet:127.0.0.1:0"])
    await server.start()
    host, port = server.sockets[0].getsockname()[:2]
    busy = await Client.inet(server)
    idle = await Client.inet(server)
    assert await idle.ask("a.example") == "OK secure match=a.example"
    await busy.send("slow1")
    await responder.wait_for_call("slow1")

    stopping = asyncio.create_task(server.stop(grace_timeout=PATIENCE))
    assert await idle.closed_by_server()
    assert not stopping.done()
    with pytest.raises(OSError):
        await Client.inet_address(host, port)

    responder.resolve("slow1")
    assert await busy.reply() == "OK later slow1"
    assert await busy.closed_by_server()
    await stopping
    assert server.connections == 0


@aio
async def test_stop_gives_up_on_requests_after_the_grace_timeout() -> None:
    responder = FakeResponder()
    server = Server(responder, ["inet:127.0.0.1:0"], request_timeout=60.0)
    await server.start()
    client = await Client.inet(server)
    await client.send("slow-hang")
    await responder.wait_for_call("slow-hang")
    await server.stop(grace_timeout=0.2)
    assert await client.closed_by_server()
    assert server.connections == 0


# --- listeners -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "listener"),
    [
        ("inet:127.0.0.1:8461", InetListener("inet:127.0.0.1:8461", "127.0.0.1", 8461)),
        ("inet:[::1]:8461", InetListener("inet:[::1]:8461", "::1", 8461)),
        ("inet:localhost:8461", InetListener("inet:localhost:8461", "localhost", 8461)),
        ("inet:0.0.0.0:0", InetListener("inet:0.0.0.0:0", "0.0.0.0", 0)),
        ("unix:/run/mtasts.sock", UnixListener("unix:/run/mtasts.sock", "/run/mtasts.sock")),
        ("systemd", SystemdListener("systemd")),
    ],
)
def test_listener_spec_is_parsed(spec: str, listener: object) -> None:
    assert parse_listener(spec) == listener


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "127.0.0.1:8461",
        "tcp:127.0.0.1:8461",
        "inet:127.0.0.1",
        "inet::8461",
        "inet:127.0.0.1:",
        "inet:127.0.0.1:port",
        "inet:127.0.0.1:65536",
        "inet:127.0.0.1:000065535",
        "inet:127.0.0.1:" + "9" * 5000,
        "inet:127.0.0.1:-1",
        "inet:::1:8461",
        "inet:[::1]8461",
        "inet:[127.0.0.1]:8461",
        "inet:[::1:8461",
        "inet:host name:8461",
        "unix:",
        "unix:relative/socket",
        "unix:/" + "x" * 200,
        "systemd:",
    ],
)
def test_bad_listener_spec_is_refused_naming_the_spec(spec: str) -> None:
    with pytest.raises(ListenerError) as info:
        parse_listener(spec)
    assert repr(spec) in str(info.value)


def test_socket_file_options_apply_to_unix_listeners() -> None:
    listener = parse_listener("unix:/run/s", mode=0o660, owner="postfix", group="")
    assert listener == UnixListener("unix:/run/s", "/run/s", 0o660, "postfix", None)
    assert parse_listener("inet:127.0.0.1:1", mode=0o600) == parse_listener("inet:127.0.0.1:1")
    with pytest.raises(ListenerError):
        parse_listener("unix:/run/s", mode=0o17777)


@aio
async def test_unix_socket_is_served_with_its_mode_owner_and_group(tmp_path: Path) -> None:
    path = str(tmp_path / "mtasts.sock")
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        uid, gid = 65534, 65534  # nobody, nogroup: only root may give a file away
    listener = parse_listener(f"unix:{path}", mode=0o640, owner=str(uid), group=gid)
    async with serving(listeners=(listener,)) as server:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (uid, gid)
        client = await Client.unix(path)
        assert await client.ask("a.example") == "OK secure match=a.example"
        assert await client.ask("b.example") == "OK secure match=b.example"
        client.close()
        assert server.requests == 2
    assert not os.path.exists(path)


@aio
async def test_unix_socket_owner_may_be_a_name(tmp_path: Path) -> None:
    path = str(tmp_path / "named.sock")
    import grp
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    listener = parse_listener(f"unix:{path}", owner=user, group=group)
    async with serving(listeners=(listener,)):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    with pytest.raises(ListenerError, match="unknown socket owner"):
        Server(FakeResponder(), [parse_listener(f"unix:{path}", owner="no-such-user-x")]).bind()


@aio
async def test_stale_unix_socket_file_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(path)
    old.close()  # the file stays behind, as after a crash
    async with serving(listeners=(f"unix:{path}",)):
        client = await Client.unix(path)
        assert await client.ask("a.example") == "OK secure match=a.example"
        client.close()


def test_live_unix_socket_or_other_file_is_not_taken(tmp_path: Path) -> None:
    path = str(tmp_path / "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen()
    try:
        with pytest.raises(ListenerError, match="another process listens"):
            Server(FakeResponder(), [f"unix:{path}"]).bind()
    finally:
        live.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(ListenerError, match="not a socket"):
        Server(FakeResponder(), [f"unix:{regular}"]).bind()
    assert regular.read_text() == "keep me"


def test_address_in_use_is_an_error_naming_the_listener() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ListenerError, match=f"inet:127.0.0.1:{port}"):
            Server(FakeResponder(), [f"inet:127.0.0.1:{port}"]).bind()
    finally:
        taken.close()


def test_failed_bind_leaves_nothing_bound(tmp_path: Path) -> None:
    path = str(tmp_path / "first.sock")
    server = Server(FakeResponder(), [f"unix:{path}", "inet:192.0.2.1:0"])
    with pytest.raises(ListenerError, match=r"192\.0\.2\.1"):
        server.bind()
    assert server.sockets == []
    assert not os.path.exists(path)


@aio
async def test_ipv6_loopback_and_localhost_listeners_serve() -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        # inet:[::1] is a documented listener: a machine that cannot bind it fails the test.
        pytest.fail(f"cannot bind [::1]: {exc}", pytrace=False)
    async with serving(listeners=("inet:[::1]:0", "inet:localhost:0")) as server:
        assert len(server.sockets) >= 2
        for index in range(len(server.sockets)):
            client = await Client.inet(server, index)
            assert await client.ask("v6.example") == "OK secure match=v6.example"
            client.close()


@aio
async def test_bind_happens_before_start_and_start_serves_those_sockets() -> None:
    server = Server(FakeResponder(), ["inet:127.0.0.1:0"])
    server.bind()
    sockets = server.sockets
    assert len(sockets) == 1
    await server.start()
    assert server.sockets == sockets
    client = await Client.inet(server)
    assert await client.ask("a.example") == "OK secure match=a.example"
    client.close()
    await server.stop()


@aio
async def test_update_listeners_keeps_unchanged_opens_new_and_closes_removed(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "new.sock")
    async with serving(listeners=("inet:127.0.0.1:0",)) as server:
        kept = server.sockets[0]
        host, port = kept.getsockname()[:2]
        connected = await Client.inet(server)

        server.update_listeners(["inet:127.0.0.1:0", f"unix:{path}"])
        assert server.sockets[0] is kept
        unix_client = await Client.unix(path)
        assert await unix_client.ask("u.example") == "OK secure match=u.example"

        server.update_listeners([f"unix:{path}"])
        assert [listener.spec for listener in server.listeners] == [f"unix:{path}"]
        with pytest.raises(OSError):
            await Client.inet_address(host, port)
        # A connection made through a removed listener goes on.
        assert await connected.ask("c.example") == "OK secure match=c.example"
        connected.close()
        unix_client.close()

        with pytest.raises(ListenerError, match="bad:spec"):
            server.update_listeners([f"unix:{path}", "bad:spec"])
    assert not os.path.exists(path)


@aio
async def test_update_listeners_applies_a_new_socket_mode_on_the_same_path(tmp_path: Path) -> None:
    path = str(tmp_path / "mode.sock")
    async with serving(listeners=(parse_listener(f"unix:{path}", mode=0o600),)) as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        server.update_listeners([parse_listener(f"unix:{path}", mode=0o666)])
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        client = await Client.unix(path)
        assert await client.ask("m.example") == "OK secure match=m.example"


@aio
async def test_update_listeners_reports_what_cannot_be_bound_and_applies_the_rest(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "other.sock")
    async with serving() as server:
        with pytest.raises(ListenerError, match=r"192\.0\.2\.1"):
            server.update_listeners([f"unix:{path}", "inet:192.0.2.1:0"])
        assert [listener.spec for listener in server.listeners] == [f"unix:{path}"]
        client = await Client.unix(path)
        assert await client.ask("a.example") == "OK secure match=a.example"
        client.close()


# --- systemd socket activation --------------------------------------------------------------


def test_systemd_fds_are_taken_only_for_this_process() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "4242"}
    assert systemd_fds(env, pid=4242) == [3, 4]
    assert systemd_fds(env, pid=4243) == []
    assert systemd_fds({"LISTEN_FDS": "1"}, pid=4242) == []
    assert systemd_fds({}, pid=4242) == []
    with pytest.raises(ListenerError, match="LISTEN_FDS"):
        systemd_fds({"LISTEN_FDS": "x", "LISTEN_PID": "4242"}, pid=4242)


def test_systemd_listener_without_passed_sockets_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    with pytest.raises(ListenerError, match="systemd"):
        Server(FakeResponder(), ["systemd"]).bind()


def test_passed_descriptor_that_is_not_a_listening_socket_is_refused() -> None:
    connected, peer = socket.socketpair()
    fd = os.dup(connected.fileno())
    try:
        with pytest.raises(ListenerError, match=f"descriptor {fd} is not a listening"):
            _adopt_systemd([fd])
        os.fstat(fd)  # still open: a refused descriptor is left alone
    finally:
        os.close(fd)
        connected.close()
        peer.close()


SYSTEMD_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys

    # What systemd does before exec: the socket at fd 3, LISTEN_PID naming the process.
    fd = int(sys.argv[1])
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())

    from postfix_mtasts.server import Server

    from postfix_mtasts.netstring import encode_reply

    class Responder:
        def lookup(self, name, key):
            return encode_reply("OK secure match=" + key)

    async def main():
        server = Server(Responder(), sys.argv[2:])
        await server.start()
        # A reload with the same configuration keeps the passed socket.
        server.update_listeners(sys.argv[2:])
        print(" ".join(listener.spec for listener in server.listeners), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("specs", [[], ["systemd"]])
@aio
async def test_systemd_activated_socket_is_served(specs: list[str]) -> None:
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    host, port = listening.getsockname()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", SYSTEMD_CHILD, str(listening.fileno()), *specs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=[listening.fileno()],
        env=env,
        text=True,
    )
    listening.close()
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        assert line.split() == ["systemd"]
        client = await Client.inet_address(host, port)
        assert await client.ask("sd.example") == "OK secure match=sd.example"
        client.close()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        assert await asyncio.to_thread(child.wait, PATIENCE) == 0
        assert child.stdout is not None
        child.stdout.close()
