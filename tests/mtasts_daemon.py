"""``postfix-mtasts serve`` as a real subprocess, for the tests that talk to it like Postfix does.

:func:`running_daemon` writes a TOML configuration in a directory of its own (listening on a free
loopback port and on a unix socket, asking the bed's resolver, trusting the bed's CA), starts
``python -m postfix_mtasts serve -c FILE``, waits until both listeners answer a socketmap request,
and at the end stops it with SIGTERM and checks that it exits 0.

The session fixture ``daemon`` is one such daemon for every test module that registers this file
with ``pytest_plugins = ["mtasts_daemon"]``. Its profiles:

- ``postfix`` (and any name without a section): the defaults, ``testing`` policies are NOTFOUND;
- ``strict``: ``testing`` policies are enforced like ``enforce`` (``secure``);
- ``opportunistic``: ``testing`` policies are answered ``may``.

The session fixture ``dane_daemon`` is a second daemon with ``[dane] enabled``, asking the bed's
validating resolver (``bed.validating_nameservers``), with the same profiles plus ``tlsrpt``
(``tlsrpt = true``: MTA-STS answers carry Postfix 3.10's TLSRPT attributes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from bed import DANE_ZONE, Bed

REPO = Path(__file__).resolve().parent.parent

START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
# Bounded waits for lookups the daemon makes against the bed (a fetch failure is quick).
HTTPS_TIMEOUT = 5.0
DNS_TIMEOUT = 2.0

PROFILES: Mapping[str, str] = {"strict": "secure", "opportunistic": "may"}

# The DANE daemon's additions: DANE on, its start-up check asks for a signed name of the bed (the
# default, the root zone, is unknown to the bed's resolvers).
DANE_EXTRA = f"""
[dane]
enabled = true
check_name = "{DANE_ZONE}"

[maps.tlsrpt]
tlsrpt = true
"""

# A parent-domain probe is answered NOTFOUND without any lookup: a harmless readiness request.
_PROBE_KEY = ".readiness.invalid"


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def _toml(value: object) -> str:
    """A TOML value; JSON's strings, numbers, booleans and arrays are valid TOML."""
    return json.dumps(value)


def daemon_config(
    bed: Bed,
    listen: list[str],
    *,
    cache_path: Path | None = None,
    log_level: str = "debug",
    extra: str = "",
    nameservers: Sequence[str] | None = None,
    settings: Mapping[str, Mapping[str, object]] | None = None,
) -> str:
    """A configuration for a daemon asking the bed: its resolver (or ``nameservers``), its CA,
    loopback policy hosts. ``settings`` adds or replaces keys per table
    (``{"cache": {"max_lookups": 4}}``); ``extra`` is TOML text appended at the end."""
    tables: dict[str, dict[str, object]] = {
        "log": {"level": log_level},
        "dns": {
            "nameservers": list(nameservers or bed.resolver_nameservers),
            "timeout": DNS_TIMEOUT,
            "lifetime": DNS_TIMEOUT * 2,
        },
        "https": {
            "ca_file": bed.ca_file,
            "timeout": HTTPS_TIMEOUT,
            "connect_timeout": HTTPS_TIMEOUT,
            "allow_private_addresses": True,
        },
        "cache": (
            {"backend": "sqlite", "path": str(cache_path)}
            if cache_path is not None
            else {"backend": "memory"}
        ),
        "policy": {"testing": "notfound"},
    }
    tables.update({f"maps.{name}": {"testing": testing} for name, testing in PROFILES.items()})
    top: dict[str, object] = {"listen": listen}
    for table, values in (settings or {}).items():
        if table == "":
            top.update(values)
        else:
            tables.setdefault(table, {}).update(values)
    lines = [f"{key} = {_toml(value)}" for key, value in top.items()]
    for table, values in tables.items():
        lines += ["", f"[{table}]"]
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n" + extra


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def socketmap_request(
    family: int, address: str | tuple[str, int], name: str, key: str, timeout: float = 5.0
) -> str:
    """One socketmap request on a fresh connection; the raw reply payload."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(netstring(f"{name} {key}".encode()))
        data = b""
        while True:
            length, colon, rest = data.partition(b":")
            if colon and length.isdigit() and len(rest) > int(length):
                if rest[int(length)] != ord(","):
                    raise ValueError(f"malformed reply {data!r}")
                return rest[: int(length)].decode()
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed after {data!r}")
            data += chunk


@dataclass
class Daemon:
    """A running ``postfix-mtasts serve``."""

    directory: Path
    config_path: Path
    config_text: str
    log_path: Path
    host: str
    port: int
    socket_path: Path
    process: subprocess.Popen[bytes]

    @property
    def inet(self) -> str:
        """The inet endpoint, ``inet:127.0.0.1:PORT``."""
        return f"inet:{self.host}:{self.port}"

    @property
    def unix(self) -> str:
        """The unix endpoint, ``unix:/path/to/socket``."""
        return f"unix:{self.socket_path}"

    def table(self, name: str = "postfix", *, endpoint: str | None = None) -> str:
        """The Postfix table of this daemon: ``socketmap:inet:127.0.0.1:PORT:NAME``."""
        return f"socketmap:{endpoint or self.inet}:{name}"

    def log(self) -> str:
        return _tail(self.log_path)

    def request(
        self, key: str, name: str = "postfix", *, unix: bool = False, timeout: float = 5.0
    ) -> str:
        """Ask the daemon directly (no Postfix): the raw reply payload."""
        if unix:
            return socketmap_request(socket.AF_UNIX, str(self.socket_path), name, key, timeout)
        return socketmap_request(socket.AF_INET, (self.host, self.port), name, key, timeout)

    def _ready(self) -> str | None:
        """None when both listeners answer the probe, else what went wrong."""
        try:
            for unix in (False, True):
                reply = self.request(_PROBE_KEY, unix=unix, timeout=1.0)
                if reply != "NOTFOUND ":
                    return f"probe answered {reply!r}"
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def stop(self) -> int:
        """SIGTERM, then wait (bounded); the exit status (killed: -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return -9
        return self.process.returncode


def _bind_failure(log_path: Path) -> bool:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return os.strerror(errno.EADDRINUSE) in text or "in use" in text


def start_daemon(
    bed: Bed,
    directory: Path,
    *,
    sqlite: bool = False,
    extra: str = "",
    nameservers: Sequence[str] | None = None,
    settings: Mapping[str, Mapping[str, object]] | None = None,
    wrapper: Sequence[str] = (),
    user: str | None = None,
) -> Daemon:
    """Start a daemon for the bed in ``directory``; fail the test with its log if it does not
    come up. A port taken between choosing and binding it is retried with another.

    ``settings``: keys per table, as for :func:`daemon_config`; ``wrapper``: a command the daemon
    runs under (``["prlimit", "--nofile=256", "--"]``); ``user``: run it as this user."""
    directory.mkdir(parents=True, exist_ok=True)
    socket_path = directory / "mtasts.sock"
    config_path = directory / "config.toml"
    log_path = directory / "daemon.log"
    for _attempt in range(5):
        port = _free_port()
        text = daemon_config(
            bed,
            [f"inet:127.0.0.1:{port}", f"unix:{socket_path}"],
            cache_path=directory / "cache.sqlite" if sqlite else None,
            extra=extra,
            nameservers=nameservers,
            settings=settings,
        )
        config_path.write_text(text)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [
                    *wrapper,
                    sys.executable,
                    "-m",
                    "postfix_mtasts",
                    "serve",
                    "-c",
                    str(config_path),
                ],
                cwd=REPO,
                user=user,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running = Daemon(
            directory, config_path, text, log_path, "127.0.0.1", port, socket_path, process
        )
        deadline = time.monotonic() + START_TIMEOUT
        problem = "not started"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            problem = running._ready() or ""
            if not problem:
                return running
            time.sleep(0.05)
        status = running.stop()
        if status != 0 and _bind_failure(log_path):
            continue
        pytest.fail(
            f"postfix-mtasts serve -c {config_path} did not come up within {START_TIMEOUT:.0f}s "
            f"(exit status {status}, last problem: {problem}); its log:\n{_tail(log_path)}",
            pytrace=False,
        )
    pytest.fail(f"postfix-mtasts serve found no free port; its log:\n{_tail(log_path)}")


@contextlib.contextmanager
def running_daemon(
    bed: Bed,
    directory: Path,
    *,
    sqlite: bool = False,
    extra: str = "",
    nameservers: Sequence[str] | None = None,
    settings: Mapping[str, Mapping[str, object]] | None = None,
    wrapper: Sequence[str] = (),
    user: str | None = None,
) -> Iterator[Daemon]:
    """A daemon for the duration of the block; it must exit 0 on SIGTERM at the end."""
    running = start_daemon(
        bed,
        directory,
        sqlite=sqlite,
        extra=extra,
        nameservers=nameservers,
        settings=settings,
        wrapper=wrapper,
        user=user,
    )
    try:
        yield running
    finally:
        status = running.stop()
    if status != 0:
        pytest.fail(
            f"postfix-mtasts serve exited with status {status} after SIGTERM (expected 0); "
            f"its log:\n{running.log()}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def daemon(bed: Bed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One ``postfix-mtasts serve`` for the session, asking the bed (profiles: see above)."""
    with running_daemon(bed, tmp_path_factory.mktemp("daemon")) as running:
        yield running


@pytest.fixture(scope="session")
def dane_daemon(bed: Bed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One ``postfix-mtasts serve`` for the session with DANE enabled, asking the bed's
    validating resolver (profiles: see above, plus ``tlsrpt``)."""
    with running_daemon(
        bed,
        tmp_path_factory.mktemp("dane-daemon"),
        extra=DANE_EXTRA,
        nameservers=bed.validating_nameservers,
    ) as running:
        yield running


# --------------------------------------------------------------------------------------------------
# postmap: Postfix's own client of the daemon (shared by the test modules that use real Postfix).

POSTMAP = "/usr/sbin/postmap"


@pytest.fixture(scope="module")
def postfix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Postfix configuration directory for ``postmap -c``: a main.cf like Debian 12's."""
    if not os.access(POSTMAP, os.X_OK):
        message = f"{POSTMAP} not found: install the Debian package postfix (tests/run does)"
        pytest.fail(message, pytrace=False)
    directory = tmp_path_factory.mktemp("postmap")
    (directory / "main.cf").write_text("compatibility_level = 3.6\n")
    return directory


@dataclass(frozen=True)
class Lookup:
    """What one tool said about one key."""

    status: int
    stdout: str
    stderr: str


def postmap(postfix_dir: Path, key: str, table: str) -> Lookup:
    result = subprocess.run(
        [POSTMAP, "-c", str(postfix_dir), "-q", key, table],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Lookup(result.returncode, result.stdout, result.stderr)
