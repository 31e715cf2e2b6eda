"""Hostile local clients against a real ``postfix-mtasts serve`` (issue 10, items 4 and 6).

Each test plays an attacker with plain sockets: one holds every connection slot with a trickle of
requests, another floods requests it never reads the answers to and then resets. Afterwards the
daemon must answer a newcomer within a client's patience, as Postfix's ``postmap -q`` or ``smtp``
would ask it, and its log must stay readable. The limits are configured small so that the floods
are small.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from bed import Bed
from mtasts_daemon import Daemon, netstring, running_daemon

from postfix_mtasts.netstring import MAX_REPLY, Decoder

# A parent-domain probe: the daemon answers it NOTFOUND at once, without any lookup.
PROBE_KEY = ".probe.invalid"
NOTFOUND = "NOTFOUND "
# How long a newcomer waits for its answer; Postfix would wait 100 s, and then defer the mail.
CLIENT_PATIENCE = 10.0

pytestmark = pytest.mark.timeout(90)


class SlowTalkers:
    """`count` connections, each sending one request every `interval` seconds and reading its
    answer: together they hold `count` slots while sending few requests. A connection the daemon
    closes is not reopened; `closed` counts them."""

    def __init__(self, daemon: Daemon, count: int, interval: float) -> None:
        self.daemon = daemon
        self.interval = interval
        self.socks = [socket.create_connection((daemon.host, daemon.port)) for _ in range(count)]
        self.peers = ["{}:{}".format(*sock.getsockname()[:2]) for sock in self.socks]
        self.answered = 0
        self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CLIENT_PATIENCE)
        for sock in self.socks:
            sock.close()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        request = netstring(f"postfix {PROBE_KEY}".encode())
        # Staggered: at any moment some connection has just been active.
        step = self.interval / len(self.socks)
        now = time.monotonic()
        due: dict[socket.socket, float] = {}
        decoders: dict[socket.socket, Decoder] = {}
        for index, sock in enumerate(self.socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            due[sock] = now + index * step
            decoders[sock] = Decoder(MAX_REPLY)
        while not self._stop.is_set() and due:
            now = time.monotonic()
            for sock, when in list(due.items()):
                if when <= now:
                    sock.send(request)
                    due[sock] = now + self.interval
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    del due[sock]
                    self.closed += 1
                    continue
                self.answered += len(decoders[sock].feed(data))
        selector.close()


def wait_for(condition: object, what: str, daemon: Daemon, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f}s; the daemon's log:\n{daemon.log()}")
        time.sleep(0.05)


def quiet_log(daemon: Daemon) -> str:
    """The daemon's log once it stopped growing for a moment (bounded)."""
    size = -1
    deadline = time.monotonic() + CLIENT_PATIENCE
    while time.monotonic() < deadline:
        text = daemon.log_path.read_text(errors="replace")
        if len(text) == size:
            return text
        size = len(text)
        time.sleep(0.5)
    return daemon.log_path.read_text(errors="replace")


def test_connections_that_hold_every_slot_do_not_keep_a_newcomer_waiting(
    bed: Bed, tmp_path: Path
) -> None:
    cap = 30
    with running_daemon(bed, tmp_path, settings={"server": {"max_connections": cap}}) as daemon:
        talkers = SlowTalkers(daemon, cap, interval=3.0)
        talkers.start()
        try:
            # Every slot is taken once every talker has had an answer.
            wait_for(lambda: talkers.answered >= cap, "the talkers were not all answered", daemon)
            started = time.monotonic()
            assert daemon.request(PROBE_KEY, timeout=CLIENT_PATIENCE) == NOTFOUND
            # A second newcomer too: room is made each time, not once.
            assert daemon.request(PROBE_KEY, timeout=CLIENT_PATIENCE) == NOTFOUND
            waited = time.monotonic() - started
            # The room was made by closing the talkers that had been quiet longest.
            wait_for(lambda: talkers.closed >= 1, "no talker was closed", daemon)
            assert talkers.closed <= 2
        finally:
            talkers.stop()
        log = quiet_log(daemon)
    assert waited < CLIENT_PATIENCE
    # (The daemon's readiness probes may still have held a slot when the talkers came.)
    made_room = [
        line
        for line in log.splitlines()
        if "closed to make room" in line and any(peer in line for peer in talkers.peers)
    ]
    # One line per connection closed (the talkers may not have seen the last close yet).
    assert 1 <= talkers.closed <= len(made_room) <= 2, made_room
    assert all("INFO" in line and "quiet for" in line for line in made_room), made_room
    # The condition itself: once, not per newcomer.
    assert log.count("the max_connections limit") == 1


def test_clients_that_flood_unread_and_reset_leave_the_daemon_answering(
    bed: Bed, tmp_path: Path
) -> None:
    clients = 20
    flood = b"".join(
        netstring(f"postfix .flood-{i:06d}.attacker.invalid".encode()) for i in range(8000)
    )
    with running_daemon(bed, tmp_path, settings={"server": {"max_connections": 30}}) as daemon:
        socks = [socket.create_connection((daemon.host, daemon.port)) for _ in range(clients)]
        peers = ["{}:{}".format(*sock.getsockname()[:2]) for sock in socks]
        for sock in socks:
            sock.setblocking(False)
        # Pipeline the flood on every connection, never reading an answer (what the kernel takes
        # without waiting, up to the whole flood) ...
        offsets = [0] * clients
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and min(offsets) < len(flood):
            progress = False
            for index, sock in enumerate(socks):
                if offsets[index] < len(flood):
                    try:
                        offsets[index] += sock.send(flood[offsets[index] : offsets[index] + 65536])
                        progress = True
                    except BlockingIOError:
                        pass
            if not progress:
                time.sleep(0.01)
        # ... then leave with the answers unread: the kernel resets the connections.
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        started = time.monotonic()
        assert daemon.request(PROBE_KEY, timeout=CLIENT_PATIENCE) == NOTFOUND
        first = time.monotonic() - started
        # Answered like any other request once the floods are gone.
        log = quiet_log(daemon)
        started = time.monotonic()
        assert daemon.request(PROBE_KEY, timeout=CLIENT_PATIENCE) == NOTFOUND
        settled = time.monotonic() - started
    assert first < 2.0, f"the first request after the resets took {first:.1f}s"
    assert settled < 1.0, f"a request took {settled:.1f}s"
    assert "socket.send() raised exception" not in log
    assert "Traceback" not in log
    for peer in peers:
        lines = [line for line in log.splitlines() if peer in line]
        assert len(lines) <= 2, lines
