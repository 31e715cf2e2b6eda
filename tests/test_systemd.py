"""The daemon under systemd, run as systemd would run it, with systemd's own tools.

- Socket activation: ``systemd-socket-activate`` holds an inet and a unix socket, starts
  ``postfix-mtasts serve`` (``listen = ["systemd"]``) at the first connection and passes both
  (``LISTEN_FDS``); the daemon answers on each, including the connection that started it.
- sd_notify: with ``NOTIFY_SOCKET`` pointing at a datagram socket the test reads, and
  ``WATCHDOG_USEC`` set, the daemon sends ``READY=1`` with a ``STATUS=`` line, ``WATCHDOG=1`` every
  half watchdog timeout, the status again every 10 s, and ``STOPPING=1`` on SIGTERM.
- The shipped unit files pass ``systemd-analyze verify``.

The tools come from Debian's ``systemd`` package (tests/run installs it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed import Bed, domain_of
from mtasts_daemon import daemon_config, running_daemon, socketmap_request

from postfix_mtasts.service import STATUS_INTERVAL, watchdog_interval

pytest_plugins = ["mtasts_daemon"]

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib"
SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"

# 0.2 s watchdog timeout: a ping every 0.1 s.
WATCHDOG_USEC = 200_000
STATUS_LINE = re.compile(
    r"answering; (\d+) domains? in memory, (\d+) lookups? running, (\d+) connections?,"
    r" cache (\w+) (ok|read-only|failing)"
)


def tool(path: str) -> str:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} not found: install the Debian package systemd", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------------
# Socket activation.


def test_socket_activation_serves_both_passed_sockets(bed: Bed, tmp_path: Path) -> None:
    port = free_port()
    unix_path = tmp_path / "socketmap.sock"
    config = tmp_path / "config.toml"
    config.write_text(daemon_config(bed, ["systemd"]))
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                tool(SOCKET_ACTIVATE),
                "-l",
                f"127.0.0.1:{port}",
                "-l",
                str(unix_path),
                "--",
                sys.executable,
                "-m",
                "postfix_mtasts",
                "serve",
                "-c",
                str(config),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while not unix_path.exists():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.05)
        # This first connection starts the daemon; it waits in the socket's queue meanwhile.
        first = socketmap_request(socket.AF_INET, ("127.0.0.1", port), "postfix", ".a.invalid", 30)
        assert first == "NOTFOUND ", log_path.read_text()
        enforce = domain_of("enforce")
        inet = socketmap_request(socket.AF_INET, ("127.0.0.1", port), "postfix", enforce, 30)
        unix = socketmap_request(socket.AF_UNIX, str(unix_path), "postfix", enforce, 30)
        assert inet.startswith("OK secure match="), log_path.read_text()
        assert unix == inet
        assert "listening on systemd" in log_path.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
    assert status == 0, log_path.read_text()


# --------------------------------------------------------------------------------------------------
# sd_notify: readiness, status, watchdog.


class NotifySocket:
    """A unix datagram socket standing in for systemd's notification socket: every message the
    daemon sends, with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            with self._lock:
                self._messages.append((time.monotonic(), data.decode()))

    def messages(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._messages)

    def assignments(self, name: str) -> list[tuple[float, str]]:
        """The values of every ``NAME=value`` line sent, with their arrival times."""
        found = []
        for when, message in self.messages():
            for line in message.splitlines():
                key, _, value = line.partition("=")
                if key == name:
                    found.append((when, value))
        return found

    def wait_for(self, name: str, value: re.Pattern[str], after: float, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, sent in self.assignments(name):
                if when > after and value.fullmatch(sent):
                    return sent
            time.sleep(0.05)
        pytest.fail(f"no {name}= matching {value.pattern} within {timeout}s: {self.messages()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """NOTIFY_SOCKET for the daemons the test starts (they inherit the environment)."""
    listening = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listening.path))
    yield listening
    listening.close()


def test_ready_status_watchdog_and_stopping_are_sent(
    bed: Bed, tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    with running_daemon(bed, tmp_path / "daemon", sqlite=True) as daemon:
        ready = [when for when, value in notify_socket.assignments("READY") if value == "1"]
        assert len(ready) == 1, notify_socket.messages()
        # READY=1 comes with the first status line, in one message.
        first = notify_socket.messages()
        ready_message = next(message for _, message in first if "READY=1" in message)
        status = ready_message.split("STATUS=", 1)[1]
        assert STATUS_LINE.fullmatch(status), status
        assert status.startswith("answering; 0 domains in memory, 0 lookups running, ")
        assert status.endswith(", cache sqlite ok")

        # The watchdog rhythm: a ping every 0.1 s. Counted over 3 s, loosely (a loaded machine
        # delays timers): clearly paced by the timeout, neither missing nor flooding.
        window_start = time.monotonic()
        time.sleep(3)
        window_end = time.monotonic()
        pings = [
            when
            for when, value in notify_socket.assignments("WATCHDOG")
            if value == "1" and window_start <= when <= window_end
        ]
        assert 10 <= len(pings) <= 45, pings

        # The status is refreshed: after a lookup, it counts the domain held.
        asked = time.monotonic()
        assert daemon.request(domain_of("enforce"), timeout=30).startswith("OK secure ")
        refreshed = notify_socket.wait_for(
            "STATUS",
            re.compile(r"answering; 1 domain in memory, .*, cache sqlite ok"),
            after=asked,
            timeout=STATUS_INTERVAL * 3,
        )
        assert STATUS_LINE.fullmatch(refreshed), refreshed
        stop_asked = time.monotonic()
    notify_socket.wait_for("STOPPING", re.compile("1"), after=stop_asked, timeout=5)
    stopping = [v for w, v in notify_socket.assignments("STATUS") if w > stop_asked]
    assert stopping[:1] == ["stopping: finishing requests in flight"], stopping


def test_no_watchdog_pings_for_another_process(
    bed: Bed, tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # WATCHDOG_PID names the process systemd watches: this daemon is not it.
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with running_daemon(bed, tmp_path / "daemon"):
        time.sleep(1.5)
    assert [v for _, v in notify_socket.assignments("READY")] == ["1"]
    assert notify_socket.assignments("WATCHDOG") == [], notify_socket.messages()


def test_a_stuck_event_loop_sends_no_watchdog_pings(
    bed: Bed, tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pings come from the event loop: while it is blocked they stop (systemd would restart
    the daemon), and they resume once it runs again. The loop is blocked for real: a reload
    (SIGHUP, handled on the loop) opens a new log file that is a FIFO nobody reads yet, and
    opening a FIFO for writing waits for a reader."""
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    with running_daemon(bed, tmp_path / "daemon") as daemon:
        daemon.config_path.write_text(
            daemon.config_text.replace("[log]\n", f"[log]\nfile = {json.dumps(str(fifo))}\n", 1)
        )
        daemon.process.send_signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING", re.compile("1"), after=0, timeout=10)
        # Blocked in open(): the loop stays stuck until the FIFO gets a reader.
        time.sleep(0.5)
        stuck = time.monotonic()
        time.sleep(2)
        during = [w for w, v in notify_socket.assignments("WATCHDOG") if w > stuck]
        assert during == [], during
        with pytest.raises(OSError):
            daemon.request(".stuck.invalid", timeout=0.5)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            freed = time.monotonic()
            notify_socket.wait_for("READY", re.compile("1"), after=freed, timeout=10)
            notify_socket.wait_for("WATCHDOG", re.compile("1"), after=freed, timeout=10)
            assert daemon.request(".free.invalid", timeout=10) == "NOTFOUND "
        finally:
            # The daemon logs into the FIFO now: keep reading until it has stopped.
            draining = threading.Event()

            def drain() -> None:
                while not draining.is_set():
                    try:
                        os.read(reader, 65536)
                    except BlockingIOError:
                        time.sleep(0.05)

            thread = threading.Thread(target=drain, daemon=True)
            thread.start()
    draining.set()
    thread.join(5)
    os.close(reader)


def test_no_watchdog_pings_without_watchdog_usec(
    bed: Bed, tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with running_daemon(bed, tmp_path / "daemon"):
        time.sleep(1.5)
    assert [v for _, v in notify_socket.assignments("READY")] == ["1"]
    assert notify_socket.assignments("WATCHDOG") == []


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, 0.0),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, 0.0),
        ({"WATCHDOG_USEC": "0"}, 0.0),
        ({"WATCHDOG_USEC": "soon"}, 0.0),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_the_watched_process(
    environ: dict[str, str], interval: float
) -> None:
    assert watchdog_interval(environ, pid=4242) == interval


# --------------------------------------------------------------------------------------------------
# The unit files.


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: the copies run this Python instead of the
    # installed /opt/postfix-mtasts/bin/postfix-mtasts.
    for name in ("postfix-mtasts.service", "postfix-mtasts.socket"):
        text = (CONTRIB / name).read_text()
        text = text.replace(
            "/opt/postfix-mtasts/bin/postfix-mtasts", f"{sys.executable} -m postfix_mtasts"
        )
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [
            tool(SYSTEMD_ANALYZE),
            "verify",
            str(tmp_path / "postfix-mtasts.socket"),
            str(tmp_path / "postfix-mtasts.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "postfix-mtasts" in line
    ]
    assert complaints == []
