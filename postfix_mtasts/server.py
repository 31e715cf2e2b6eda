"""The socketmap server: connections, limits and timeouts, back-pressure, graceful stop.

One asyncio event loop owns every connection. Each connection is an `asyncio.Protocol` whose
data callback decodes the request frames (`netstring`) and asks the responder. A responder
answers a cached domain with the framed reply at once, and the server writes it as it is from
the data callback itself: no task, queue or thread hand-off on the hot path. A domain that is not
cached yet is answered with a future; the reply is written when it resolves, in request order,
and a slow future holds back only the connection that asked.

Per connection, at most `max_pipelined` requests are in flight; what a read brings beyond them,
or while the client does not read its replies, waits with reading paused. Once a connection fails
(a write to a client that left), nothing more is answered or written for it.

The server knows nothing of policies: it turns frames into ``(name, key)`` and writes the bytes
the responder hands back. Where it listens is `listeners`' business (notation, binding, socket
ownership, systemd); the server watches the bound sockets itself, so that the cap on connections
is its own to apply: at the cap, a client waiting to be accepted is accepted, and the connection
active least recently is closed to make room (Postfix's clients reconnect by themselves).
Connections that hold their slots with a trickle of requests cannot keep new clients, and with
them the mail, waiting.

Binding (`Server.bind`) is a step of its own so that a caller can bind privileged ports or
socket paths as root, then detach and drop privileges, then `start` serving.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import socket
from collections.abc import Iterable
from typing import Protocol

from postfix_mtasts import netstring
from postfix_mtasts.config import Config, ServerConfig
from postfix_mtasts.listeners import (
    Bound,
    Listener,
    ListenerError,
    SystemdListener,
    addresses,
    bind,
    parse_listener,
    systemd_fds,
)
from postfix_mtasts.netstring import (
    Decoder,
    FramingError,
    RequestError,
    parse_request,
    perm,
    temp,
)

__all__ = ["Responder", "Server"]

log = logging.getLogger(__name__)

# Errors from accept() that mean "the process or system ran out of something": back off.
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY_DELAY = 1.0
# At the cap, room is made by aborting connections; their descriptors are freed an iteration of
# the loop later. At most this many are on their way out, so that descriptors stay within
# max_connections plus these.
_MAX_EVICTING = 8
# How long a closed connection may keep unread replies before it is aborted.
_CLOSE_LINGER = 10.0


class Responder(Protocol):
    """What the server asks: the framed reply for one request (`netstring.encode_reply`).

    `lookup` returns either the reply bytes at once, or an `asyncio.Future` of them, resolved
    later on the same loop. The server writes them as they are. It never cancels that future, so
    it may be shared between several askers.
    """

    def lookup(self, name: str, key: str) -> bytes | asyncio.Future[bytes]: ...


# --- connections -----------------------------------------------------------------------------


class _Pending:
    """One request waiting for its future, holding its place in the connection's reply order."""

    __slots__ = ("connection", "future", "key", "name", "reply", "timer")

    def __init__(
        self, connection: _Connection, name: str, key: str, future: asyncio.Future[bytes]
    ) -> None:
        self.connection = connection
        self.name = name
        self.key = key
        self.future = future
        self.reply: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None

    def done(self, future: asyncio.Future[bytes]) -> None:
        self.connection._lookup_done(self, future)

    def timed_out(self) -> None:
        self.connection._lookup_timed_out(self)


class _Connection(asyncio.Protocol):
    """One client connection: frames in, replies out, in request order.

    At most `Server.max_pipelined` requests are in flight (waiting for a lookup, or answered
    behind one that is): the frames a read brings beyond that, or while the client does not read
    its replies, are held, with reading paused, and answered when there is room. Once the
    transport fails nothing more is answered or written.
    """

    def __init__(self, server: Server, peer: str) -> None:
        self._server = server
        self._loop = server._loop_or_fail()
        self._lookup = server.responder.lookup
        self._decoder = Decoder(netstring.MAX_QUERY)
        self._transport: asyncio.Transport | None = None
        self._peer = peer
        # Replies not yet written: bytes when ready, _Pending while its future runs. Empty in
        # the common case, where a reply is written the moment it is known.
        self._queue: collections.deque[bytes | _Pending] = collections.deque()
        self._pending = 0
        # Frames are taken from the decoder a batch (max_pipelined) at a time: what a read
        # brings beyond a batch waits in the decoder as bytes (`_backlog`), and what a batch
        # holds beyond the pipeline bound waits here, from `_held_from` on. Reading is paused
        # while either waits, so together they are at most what one read brought.
        self._batch = server.max_pipelined
        self._backlog = False
        self._held: list[bytes] | None = None
        self._held_from = 0
        # When a request was last received or a reply last sent. From the accept on: a
        # connection still being set up is a recent one, not the first to make room.
        self._last_activity = self._loop.time()
        self._partial_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._reading_paused = False
        self._shutting_down = False
        self._eof = False
        self._closed = False
        self._evicted = False
        self._released = False

    # asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        server = self._server
        if self._closed or server._stopping:
            self._closed = True
            transport.close()
            return
        self._last_activity = self._loop.time()
        self._timer = self._loop.call_at(
            self._last_activity + server.idle_timeout, self._check_timeouts
        )

    def data_received(self, data: bytes) -> None:
        # No call while frames are held: reading is paused then (asyncio delivers nothing
        # between pause_reading() and resume_reading()).
        if self._closed or self._shutting_down:
            return
        try:
            frames = self._decoder.feed(data, self._batch)
        except FramingError as exc:
            self._framing_error(exc)
            return
        now = self._loop.time()
        self._last_activity = now
        if self._decoder.buffered:
            if self._partial_since is None:
                self._partial_since = now
                self._arm_frame_timeout()
        else:
            self._partial_since = None
        if frames:
            self._server.requests += len(frames)
            self._process(frames, 0)
            if len(frames) == self._batch:
                # The read brought a batch, and maybe more: the rest waits in the decoder.
                self._backlog = True
                self._take_buffered()

    def _framing_error(self, exc: FramingError) -> None:
        self._server.framing_errors += 1
        log.warning("socketmap client %s: %s; closing the connection", self._peer, exc)
        self._close()

    def eof_received(self) -> bool | None:
        if self._queue or self._held is not None or self._backlog:
            # The client finished sending; keep the connection to deliver what it asked for.
            self._eof = True
            return True
        return None

    def pause_writing(self) -> None:
        # The client does not read its replies: answer no more of its requests until it does.
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._go_on()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        unanswered = len(self._queue)
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Pending):
                item.future.remove_done_callback(item.done)
                if item.timer is not None:
                    item.timer.cancel()
        if self._held is not None:
            unanswered += len(self._held) - self._held_from
            self._held = None
        self._pending = 0
        self._transport = None
        if exc is not None:
            # One line per connection, however many replies it leaves undelivered.
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.info(
                "socketmap client %s: connection lost (%s)%s",
                self._peer,
                reason,
                f"; {unanswered} request(s) left unanswered" if unanswered else "",
            )
        self._release()

    # requests -----------------------------------------------------------------------------

    def _process(self, frames: list[bytes], start: int) -> None:
        """Answer `frames[start:]` in order while the pipeline bound and the client's reading
        allow; hold the rest. The caller has checked that the first may be answered."""
        lookup = self._lookup
        queue = self._queue
        transport = self._transport
        assert transport is not None
        index = start
        for payload in itertools.islice(frames, start, None) if start else frames:
            # A reply written may have paused writing, or failed: asyncio then closes the
            # transport, and every later write would only log "socket.send() raised exception.".
            # A deferred reply may have filled the pipeline.
            if index != start and (
                self._write_paused
                or len(queue) >= self._server.max_pipelined
                or transport.is_closing()
            ):
                self._hold(frames, index)
                return
            index += 1
            try:
                name, key = parse_request(payload)
            except RequestError as exc:
                self._server.bad_requests += 1
                self._send(perm(exc.reason))
                continue
            try:
                result = lookup(name, key)
            except Exception:
                self._server.lookup_errors += 1
                log.exception("%s: lookup failed (map %s); answered TEMP", _key(key), name)
                self._send(temp("lookup failed"))
                continue
            if not isinstance(result, bytes):
                self._defer(name, key, result)
                continue
            # As _send does, without the call: this is the hot path.
            if queue:
                queue.append(result)
            else:
                transport.write(result)
        if queue:
            self._update_reading()

    def _hold(self, frames: list[bytes], index: int) -> None:
        self._held = frames
        self._held_from = index
        assert self._transport is not None
        if self._transport.is_closing():
            # A write failed: connection_lost follows, drops what is held and says so.
            self._closed = True
            return
        self._update_reading()

    def _take_buffered(self) -> None:
        """Answer the complete frames the decoder holds beyond the last batch, a batch at a
        time, as far as the pipeline bound and the client's reading allow."""
        while (
            self._backlog
            and self._held is None
            and not self._closed
            and not self._write_paused
            and len(self._queue) < self._batch
        ):
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            try:
                frames = self._decoder.feed(b"", self._batch)
            except FramingError as exc:
                self._framing_error(exc)
                return
            self._backlog = len(frames) == self._batch
            if not frames:
                break
            self._server.requests += len(frames)
            self._process(frames, 0)
        if not self._backlog and not self._decoder.buffered:
            self._partial_since = None
        self._update_reading()

    def _go_on(self) -> None:
        """After the pipeline or the client's reading made room: answer held frames, read
        again, or close once a client that finished sending has all its replies."""
        transport = self._transport
        if self._closed or transport is None:
            return
        if transport.is_closing():
            self._closed = True  # a write failed; connection_lost follows
            return
        held = self._held
        if (
            held is not None
            and not self._write_paused
            and len(self._queue) < self._server.max_pipelined
        ):
            self._held = None
            # Replies are sent again: the connection is not idle.
            self._last_activity = self._loop.time()
            self._process(held, self._held_from)
            if self._closed:
                return
        self._take_buffered()
        if (
            not self._queue
            and self._held is None
            and not self._backlog
            and (self._eof or (self._shutting_down and not self._decoder.buffered))
        ):
            self._close()

    # replies ------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._queue:
            self._queue.append(data)
        else:
            assert self._transport is not None
            self._transport.write(data)

    def _defer(self, name: str, key: str, future: asyncio.Future[bytes]) -> None:
        if not asyncio.isfuture(future):
            self._server.lookup_errors += 1
            log.error(
                "%s: responder returned %s, not a reply or a future (map %s); answered TEMP",
                _key(key),
                type(future).__name__,
                name,
            )
            self._send(temp("internal error"))
            return
        self._server.deferred += 1
        pending = _Pending(self, name, key, future)
        self._queue.append(pending)
        self._pending += 1
        pending.timer = self._loop.call_later(self._server.request_timeout, pending.timed_out)
        future.add_done_callback(pending.done)

    def _lookup_done(self, pending: _Pending, future: asyncio.Future[bytes]) -> None:
        if self._closed or pending.reply is not None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        server = self._server
        if future.cancelled():
            server.lookup_errors += 1
            log.error(
                "%s: lookup cancelled (map %s); answered TEMP", _key(pending.key), pending.name
            )
            reply = temp("lookup cancelled")
        elif (exc := future.exception()) is not None:
            server.lookup_errors += 1
            log.error(
                "%s: lookup failed (map %s): %s; answered TEMP",
                _key(pending.key),
                pending.name,
                exc,
                exc_info=exc,
            )
            reply = temp(f"lookup failed: {exc}")
        else:
            result = future.result()
            if isinstance(result, bytes):
                reply = result
            else:
                server.lookup_errors += 1
                log.error(
                    "%s: lookup returned %s, not a reply (map %s); answered TEMP",
                    _key(pending.key),
                    type(result).__name__,
                    pending.name,
                )
                reply = temp("internal error")
        self._resolve(pending, reply)

    def _lookup_timed_out(self, pending: _Pending) -> None:
        if self._closed or pending.reply is not None:
            return
        pending.timer = None
        # The future may be shared with other askers: stop waiting for it, never cancel it.
        pending.future.remove_done_callback(pending.done)
        self._server.lookup_timeouts += 1
        timeout = self._server.request_timeout
        log.error(
            "%s: lookup did not finish within %gs (map %s); answered TEMP",
            _key(pending.key),
            timeout,
            pending.name,
        )
        self._resolve(pending, temp(f"lookup timed out after {timeout:g}s"))

    def _resolve(self, pending: _Pending, reply: bytes) -> None:
        pending.reply = reply
        self._pending -= 1
        queue = self._queue
        transport = self._transport
        assert transport is not None
        wrote = False
        while queue:
            head = queue[0]
            if isinstance(head, _Pending):
                if head.reply is None:
                    break
                data = head.reply
            else:
                data = head
            if transport.is_closing():
                self._closed = True  # a write failed; connection_lost follows
                return
            transport.write(data)
            queue.popleft()
            wrote = True
        if wrote:
            self._last_activity = self._loop.time()
            self._go_on()

    # flow control, timeouts, closing --------------------------------------------------------

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        pause = (
            self._write_paused
            or self._shutting_down
            or self._held is not None
            or self._backlog
            or len(self._queue) >= self._server.max_pipelined
        )
        if pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
            if self._partial_since is not None:
                # The rest of the request may come now: its time starts again.
                self._partial_since = self._loop.time()
                self._arm_frame_timeout()

    def _arm_frame_timeout(self) -> None:
        assert self._partial_since is not None
        deadline = self._partial_since + self._server.frame_timeout
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._check_timeouts)

    def _check_timeouts(self) -> None:
        # One timer per connection, moved forward lazily: the hot path only stores a time.
        self._timer = None
        if self._closed:
            return
        server = self._server
        now = self._loop.time()
        # While we do not read, the rest of a request cannot arrive: not the client's delay.
        if self._partial_since is not None and not self._reading_paused:
            deadline = self._partial_since + server.frame_timeout
            if now >= deadline:
                server.frame_timeouts += 1
                log.info(
                    "socketmap client %s: request incomplete after %gs; closing the connection",
                    self._peer,
                    server.frame_timeout,
                )
                self._close()
                return
        elif self._queue:
            # A request is in flight: its own timeout answers it; idleness starts afterwards.
            deadline = now + server.idle_timeout
        else:
            deadline = self._last_activity + server.idle_timeout
            if now >= deadline:
                server.idle_timeouts += 1
                log.debug("socketmap client %s: idle; closing the connection", self._peer)
                self._close()
                return
        self._timer = self._loop.call_at(deadline, self._check_timeouts)

    def _shutdown(self) -> None:
        """Graceful stop: read no more requests, answer those received, then close."""
        if self._closed:
            return
        self._shutting_down = True
        self._update_reading()
        if not self._queue and self._held is None and not self._backlog:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        transport = self._transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size():
            # close() waits until the client has read its replies; one that never reads would
            # keep the connection, and its slot, forever.
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(_CLOSE_LINGER, transport.abort)

    def _abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def _evict(self, now: float) -> None:
        """Close this connection (without its replies) to make room for a new client."""
        self._evicted = True
        if not self._closed:
            unanswered = len(self._queue) + (
                len(self._held) - self._held_from if self._held is not None else 0
            )
            log.info(
                "socketmap client %s: closed to make room for a new client (max_connections "
                "reached); quiet for %.1fs%s",
                self._peer,
                now - self._last_activity,
                f", {unanswered} request(s) left unanswered" if unanswered else "",
            )
        # abort(), not close(): a client that does not read would keep a close() open forever.
        self._abort()

    def _release(self) -> None:
        # Called by connection_lost, or by the set-up task when no transport came to be;
        # sometimes both: count the connection as gone exactly once.
        if not self._released:
            self._released = True
            self._server._connection_lost(self)


def _eviction_order(connection: _Connection) -> tuple[int, float]:
    # Closing already, then idle, then waiting for a lookup; each the least recently active first.
    if connection._closed:
        rank = 0
    elif connection._queue:
        rank = 2
    else:
        rank = 1
    return rank, connection._last_activity


def _peer_name(address: object) -> str:
    # From accept(), not from the transport: a client that has already reset has no peer name
    # any more, and its one log line must still say who it was.
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unix"


def _key(key: str) -> str:
    # Keys come from the network; repr() keeps odd ones on one readable log line.
    return key if key.isprintable() and len(key) <= 300 else repr(key[:300])


# --- the server ------------------------------------------------------------------------------


class Server:
    """Serves `responder` on `listeners` (specs or `Listener` values) on one asyncio loop.

    Use: `bind()` (optional, to bind before dropping privileges), `await start()`, and on
    shutdown `await stop()`. `update_listeners()` applies a reloaded configuration.

    If systemd passed sockets to this process (``LISTEN_FDS``/``LISTEN_PID``, read when the
    server is created), they are served too, as if ``systemd`` were listed, also after a reload.

    The counters (`requests`, `deferred`, `bad_requests`, ...) are plain integers for statistics.
    """

    def __init__(
        self,
        responder: Responder,
        listeners: Iterable[Listener | str] = Config.listen,
        *,
        max_connections: int = ServerConfig.max_connections,
        idle_timeout: float = ServerConfig.idle_timeout,
        request_timeout: float = ServerConfig.request_timeout,
        frame_timeout: float = 10.0,
        grace_timeout: float = 10.0,
        max_pipelined: int = 100,
        backlog: int = 1024,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if min(idle_timeout, request_timeout, frame_timeout) <= 0 or grace_timeout < 0:
            raise ValueError("timeouts must be positive")
        self.responder = responder
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.frame_timeout = frame_timeout
        self.grace_timeout = grace_timeout
        self.max_pipelined = max(1, max_pipelined)
        self.backlog = backlog

        # Statistics.
        self.connections_accepted = 0
        self.requests = 0
        self.deferred = 0
        self.bad_requests = 0
        self.framing_errors = 0
        self.lookup_errors = 0
        self.lookup_timeouts = 0
        self.idle_timeouts = 0
        self.frame_timeouts = 0

        # Read once, here: after a fork (detaching) LISTEN_PID no longer names this process.
        self._systemd_fds = systemd_fds()
        self._listeners = self._with_systemd(listeners)
        self._bound: dict[Listener, Bound] = {}
        self._systemd_adopted = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._accept_retry: asyncio.TimerHandle | None = None
        # Accepted sockets, from accept() until connection_lost: the number the cap applies to.
        self._active = 0
        # Of those, the ones aborted to make room and not gone yet.
        self._evicting = 0
        self._connections: set[_Connection] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._cap_warned_at: float | None = None
        self._started = False
        self._stopping = False
        self._idle: asyncio.Future[None] | None = None

    # public -------------------------------------------------------------------------------

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return self._listeners

    @property
    def sockets(self) -> list[socket.socket]:
        """The bound listening sockets (for `getsockname()`, or to keep them across a fork)."""
        return [sock for bound in self._bound.values() for sock in bound.sockets]

    @property
    def connections(self) -> int:
        """Open connections, including those accepted but not yet set up."""
        return self._active

    def bind(self) -> None:
        """Bind every listener now (idempotent). Raises `ListenerError`; binds none on error."""
        opened: list[Bound] = []
        try:
            for listener in self._listeners:
                if listener not in self._bound:
                    bound = self._open(listener)
                    opened.append(bound)
                    self._bound[listener] = bound
        except BaseException:
            for bound in opened:
                self._bound.pop(bound.listener, None)
                bound.close()
            raise

    async def start(self) -> None:
        """Bind what is not bound yet and start accepting connections on the running loop."""
        if self._started:
            raise RuntimeError("server already started")
        self.bind()
        self._loop = asyncio.get_running_loop()
        self._started = True
        for bound in self._bound.values():
            log.info("listening on %s (%s)", bound.listener.spec, addresses(bound))
        self._resume_accepting()

    async def stop(self, grace_timeout: float | None = None) -> None:
        """Stop accepting, let requests in flight finish, close every connection.

        Waits at most `grace_timeout` seconds (default: the constructor's) for requests in flight;
        connections still busy then are closed without their replies.
        """
        if self._stopping:
            return
        self._stopping = True
        self._pause_accepting()
        if self._accept_retry is not None:
            self._accept_retry.cancel()
            self._accept_retry = None
        for bound in self._bound.values():
            bound.close()
            log.info("stopped listening on %s", bound.listener.spec)
        self._bound.clear()
        if self._loop is None:
            return
        for connection in list(self._connections):
            connection._shutdown()
        grace = self.grace_timeout if grace_timeout is None else grace_timeout
        if not await self._wait_idle(grace):
            busy = len(self._connections)
            log.warning("stop: %d connection(s) still busy after %gs; closing them", busy, grace)
            for connection in list(self._connections):
                connection._abort()
            for task in list(self._handshakes):
                task.cancel()
            await self._wait_idle(1.0)

    def update_listeners(self, listeners: Iterable[Listener | str]) -> None:
        """Listen on `listeners` from now on (a reloaded configuration).

        Listeners equal to a current one keep their sockets; removed ones are closed (their open
        connections go on); new ones are bound. Raises `ListenerError` naming the listeners that
        could not be bound, after applying everything else.
        """
        if self._stopping:
            raise RuntimeError("server is stopping")
        wanted = self._with_systemd(listeners)
        for listener in [item for item in self._bound if item not in wanted]:
            bound = self._bound.pop(listener)
            self._unwatch(bound)
            bound.close()
            log.info("stopped listening on %s", listener.spec)
        errors: list[str] = []
        for listener in wanted:
            if listener in self._bound:
                continue
            try:
                bound = self._open(listener)
            except ListenerError as exc:
                errors.append(str(exc))
                continue
            self._bound[listener] = bound
            if self._started:
                log.info("listening on %s (%s)", listener.spec, addresses(bound))
                if self._accepting:
                    self._watch(bound)
        self._listeners = tuple(item for item in wanted if item in self._bound)
        if errors:
            raise ListenerError("; ".join(errors))

    # listening ----------------------------------------------------------------------------

    def _with_systemd(self, listeners: Iterable[Listener | str]) -> tuple[Listener, ...]:
        parsed = [
            item if isinstance(item, Listener) else parse_listener(item) for item in listeners
        ]
        if self._systemd_fds and not any(isinstance(item, SystemdListener) for item in parsed):
            parsed.append(SystemdListener("systemd"))
        return tuple(dict.fromkeys(parsed))

    def _open(self, listener: Listener) -> Bound:
        if isinstance(listener, SystemdListener):
            # Once closed, the descriptor numbers may belong to other files: never adopt twice.
            if self._systemd_adopted:
                raise ListenerError("listener 'systemd': the passed sockets were already closed")
            bound = bind(listener, self.backlog, self._systemd_fds)
            self._systemd_adopted = True
            return bound
        return bind(listener, self.backlog, ())

    def _loop_or_fail(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("server not started")
        return self._loop

    def _watch(self, bound: Bound) -> None:
        loop = self._loop_or_fail()
        for sock in bound.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch(self, bound: Bound) -> None:
        if self._loop is None or not self._accepting:
            return
        for sock in bound.sockets:
            self._loop.remove_reader(sock.fileno())

    def _resume_accepting(self) -> None:
        if self._accepting or self._stopping or not self._started:
            return
        self._accepting = True
        for bound in self._bound.values():
            self._watch(bound)

    def _pause_accepting(self) -> None:
        if not self._accepting:
            return
        for bound in self._bound.values():
            self._unwatch(bound)
        self._accepting = False

    def _accept(self, listening: socket.socket) -> None:
        loop = self._loop_or_fail()
        for _ in range(self.backlog):
            full = self._active - self._evicting >= self.max_connections
            if full and self._evicting >= _MAX_EVICTING:
                # Accepting resumes as those being closed are gone (_connection_lost).
                self._pause_accepting()
                return
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    log.error(
                        "cannot accept connections: %s; retrying in %gs",
                        exc.strerror,
                        _ACCEPT_RETRY_DELAY,
                    )
                    self._pause_accepting()
                    self._accept_retry = loop.call_later(_ACCEPT_RETRY_DELAY, self._retry_accepting)
                    return
                raise
            if full:
                # Only now that a client is known to wait.
                self._make_room(loop.time())
            sock.setblocking(False)
            self._active += 1
            self.connections_accepted += 1
            connection = _Connection(self, _peer_name(address))
            self._connections.add(connection)
            task = loop.create_task(self._set_up(sock, connection))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _retry_accepting(self) -> None:
        self._accept_retry = None
        self._resume_accepting()

    def _make_room(self, now: float) -> None:
        """Close the connection active least recently, preferring one that waits for no lookup.

        A slot is held as long as its client keeps the connection open, however rarely it asks;
        Postfix's clients reconnect by themselves when a connection is closed. A scan here, at
        the cap, costs the hot path nothing.
        """
        if self._cap_warned_at is None or now - self._cap_warned_at >= 60.0:
            self._cap_warned_at = now
            log.warning(
                "%d connections open (the max_connections limit); closing the least recently "
                "active ones to make room for new clients",
                self.max_connections,
            )
        candidates = (c for c in self._connections if not c._evicted)
        victim = min(candidates, key=_eviction_order, default=None)
        if victim is not None:
            victim._evict(now)
            self._evicting += 1

    async def _set_up(self, sock: socket.socket, connection: _Connection) -> None:
        # Once per connection, not per request: the public way to wrap an accepted socket.
        loop = self._loop_or_fail()
        try:
            await loop.connect_accepted_socket(lambda: connection, sock)
        except BaseException as exc:
            sock.close()
            connection._closed = True
            connection._release()
            if not isinstance(exc, Exception):
                raise
            log.warning("cannot set up a connection: %s", exc)

    def _connection_lost(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        self._active -= 1
        if connection._evicted:
            self._evicting -= 1
        if self._accept_retry is None:
            self._resume_accepting()
        if self._active == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def _wait_idle(self, timeout: float) -> bool:
        if self._active == 0:
            return True
        loop = self._loop_or_fail()
        self._idle = loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._idle), timeout)
        except TimeoutError:
            return False
        return True
