"""``postfix-mtasts health``: the real CLI against a real daemon, and against servers that fail it.

The check a monitoring system or a container runtime runs: one line on standard output, exit 0
when the daemon answered its probe correctly in time, 1 otherwise, naming the endpoint and why.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mtasts_daemon import Daemon

pytest_plugins = ["mtasts_daemon"]

REPO = Path(__file__).resolve().parent.parent

OK_LINE = re.compile(r"OK: postfix-mtasts at (\S+) answered in (\d+) ms")


def health(*options: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m postfix_mtasts health`` as a monitoring system would."""
    return subprocess.run(
        [sys.executable, "-m", "postfix_mtasts", "health", *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result
    assert result.stderr == "", result
    return lines[0]


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A listening socket that takes connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"inet:127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def answering_server(reply: bytes) -> Iterator[str]:
    """A server that answers every connection with ``reply`` (raw bytes) once it has read."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(5)
                    with contextlib.suppress(OSError):
                        conn.recv(1024)
                        conn.sendall(reply)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield f"inet:127.0.0.1:{sock.getsockname()[1]}"
        finally:
            stop.set()
            thread.join(5)


def closed_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"inet:127.0.0.1:{sock.getsockname()[1]}"


def test_a_running_daemon_is_ok_on_its_inet_listener(daemon: Daemon) -> None:
    result = health("--socketmap", daemon.inet)
    line = one_line(result)
    assert result.returncode == 0, result
    match = OK_LINE.fullmatch(line)
    assert match is not None, line
    assert match[1] == daemon.inet
    assert 1 <= int(match[2]) <= 5000


def test_a_running_daemon_is_ok_on_its_unix_listener(daemon: Daemon) -> None:
    result = health("--socketmap", daemon.unix)
    assert result.returncode == 0, result
    assert one_line(result).startswith(f"OK: postfix-mtasts at {daemon.unix} answered in ")


def test_without_socketmap_the_first_listener_of_the_configuration_is_asked(
    daemon: Daemon,
) -> None:
    result = health("-c", str(daemon.config_path))
    assert result.returncode == 0, result
    assert one_line(result).startswith(f"OK: postfix-mtasts at {daemon.inet} answered in ")


def test_a_systemd_listener_means_the_socket_units_address(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('listen = ["systemd"]\n\n[cache]\nbackend = "memory"\n')
    line = one_line(health("-c", str(config), "--timeout", "2"))
    # Whether or not something answers there on this machine, that is where it asks.
    assert line.startswith(("OK: postfix-mtasts at inet:127.0.0.1:8461 ", "CRITICAL: "))
    assert "postfix-mtasts at inet:127.0.0.1:8461" in line


def test_a_closed_port_is_critical_and_says_refused() -> None:
    endpoint = closed_port()
    result = health("--socketmap", endpoint)
    assert result.returncode == 1, result
    assert one_line(result) == (
        f"CRITICAL: postfix-mtasts at {endpoint}: connection refused (is the daemon running?)"
    )


def test_a_missing_unix_socket_is_critical(tmp_path: Path) -> None:
    endpoint = f"unix:{tmp_path / 'no.sock'}"
    result = health("--socketmap", endpoint)
    assert result.returncode == 1, result
    assert one_line(result) == (
        f"CRITICAL: postfix-mtasts at {endpoint}: no such socket (is the daemon running?)"
    )


def test_a_server_that_never_answers_is_critical_within_the_timeout() -> None:
    with silent_server() as endpoint:
        started = time.monotonic()
        result = health("--socketmap", endpoint, "--timeout", "2")
        took = time.monotonic() - started
    assert result.returncode == 1, result
    assert one_line(result) == f"CRITICAL: postfix-mtasts at {endpoint}: no answer within 2 s"
    # It waited for the answer, and gave up on time (the interpreter's start included).
    assert 2 <= took < 12


def test_a_wrong_answer_is_critical_and_shown_safely() -> None:
    with answering_server(b"13:OK secure\x1b[2J,") as endpoint:
        result = health("--socketmap", endpoint)
    assert result.returncode == 1, result
    line = one_line(result)
    assert line.startswith(f"CRITICAL: postfix-mtasts at {endpoint}: wrong answer to ")
    assert "'OK secure\\x1b[2J'" in line
    assert "\x1b" not in line


def test_a_connection_closed_without_an_answer_is_critical() -> None:
    with answering_server(b"") as endpoint:
        result = health("--socketmap", endpoint)
    assert result.returncode == 1, result
    assert one_line(result) == (
        f"CRITICAL: postfix-mtasts at {endpoint}: connection closed without a reply"
    )


def test_an_unreadable_configuration_is_critical_and_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("listen = [\n")
    result = health("-c", str(config))
    assert result.returncode == 1, result
    line = one_line(result)
    assert line.startswith("CRITICAL: cannot tell where postfix-mtasts listens: ")
    assert str(config) in line


def test_help_lists_the_exit_statuses() -> None:
    result = health("--help")
    assert result.returncode == 0
    assert "exit status:" in result.stdout
    for status in ("0  OK", "1  CRITICAL", "2  usage error"):
        assert status in result.stdout
