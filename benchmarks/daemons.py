"""The two daemons under test, started with equivalent settings against the same bed.

- ours: ``.venv/bin/postfix-mtasts serve -c config.toml`` (the bed's resolver, the bed's CA,
  private addresses allowed since the policy hosts are on loopback).
- the peer: postfix-mta-sts-resolver 1.5.1 (``mta-sts-daemon -c config.yml``) from its own venv.
  It reads only /etc/resolv.conf and fetches from port 443: it runs in a private mount namespace
  (``unshare -m``) where a file naming the bed's resolver is bind-mounted over /etc/resolv.conf
  (the machine's own file is never touched); ``SSL_CERT_FILE`` makes it trust the bed's CA.

Equivalent settings: both answer ``testing`` policies NOTFOUND; the same fetch timeout; a cached
policy's TXT record is rechecked after 300 s by both (ours in the background:
``cache.txt_check_interval``; the peer inline: ``cache_grace``, raised from its 60 s default so
that a round of cached answers measures the cache, not a recheck); each with an in-memory, a
SQLite, a Redis and a PostgreSQL cache (the last two on servers the harness starts, named by a
``SharedStore``); logging at warning level.

Ours runs the package of the checkout this file is in (``PYTHONPATH``), whichever checkout the
venv's editable install points at: a git worktree sharing another checkout's venv measures its
own code.

Each daemon is a direct child (``unshare`` and ``sh`` exec into the peer's Python), so the pid
we hold is the daemon's: /proc/<pid>/stat gives its CPU time and /proc/<pid>/status its RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bedtools import Bed

REPO = Path(__file__).resolve().parent.parent
OURS_BIN = REPO / ".venv" / "bin" / "postfix-mtasts"
PEER_VERSION = "1.5.1"
PEER_REQUIREMENT = f"postfix-mta-sts-resolver[sqlite,redis,postgres,uvloop]=={PEER_VERSION}"
# What the peer imports for its caches and loop (the extras above), checked in its venv.
PEER_MODULES = ("uvloop", "aiosqlite", "redis", "asyncpg")
DEFAULT_PEER_VENV = Path(__file__).resolve().parent / ".peer-venv"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Fetch timeout of both daemons (ours: https.timeout; the peer: default_zone.timeout).
FETCH_TIMEOUT = 10.0
DNS_TIMEOUT = 5.0
TXT_RECHECK = 300
# A parent-domain probe: both daemons answer it NOTFOUND at once, without any lookup.
PROBE_KEY = ".readiness.invalid"

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def clean_env() -> dict[str, str]:
    """The environment for a daemon: no proxy settings, and bytecode caching as on an installed
    system (this machine's environment may set PYTHONDONTWRITEBYTECODE, which makes every start
    compile the package's source again)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and k != "PYTHONDONTWRITEBYTECODE"
    }


def compile_ours() -> None:
    """Byte-compile the package, as pip does when it installs one (the checkout is an editable
    install, which pip does not compile)."""
    subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "python"),
            "-m",
            "compileall",
            "-q",
            str(REPO / "postfix_mtasts"),
        ],
        env=clean_env(),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def socketmap_request(port: int, key: str, timeout: float = 5.0, name: str = "postfix") -> str:
    """One request on a fresh connection to 127.0.0.1:port; the reply payload."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(netstring(f"{name} {key}".encode()))
        data = b""
        while True:
            length, colon, rest = data.partition(b":")
            if colon and length.isdigit() and len(rest) > int(length):
                return rest[: int(length)].decode()
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed after {data!r}")
            data += chunk


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


class DaemonError(Exception):
    pass


@dataclass(frozen=True)
class SharedStore:
    """A Redis or PostgreSQL server a daemon keeps its cache on.

    ``backend`` is ours' name for it (``cache.backend``: "redis" or "postgresql"); ours reaches it
    at ``url`` with ``name`` as its key prefix (Redis) or table (PostgreSQL); the peer at
    ``peer_url`` (its ``cache.options.url`` for Redis, ``dsn`` for PostgreSQL), kept apart from
    ours (another Redis database, another PostgreSQL database)."""

    backend: str
    url: str
    name: str
    peer_url: str

    @property
    def peer_type(self) -> str:
        """The peer's ``cache.type`` for this backend."""
        return {"redis": "redis", "postgresql": "postgres"}[self.backend]


@dataclass
class Daemon:
    """A running daemon: which one, its port, its process, its log."""

    kind: str  # "ours" or "peer"
    cache: str  # "memory", "sqlite", "redis" or "postgresql"
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    cache_path: Path | None
    started: float
    ready_after: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon process (all its threads)."""
        text = Path(f"/proc/{self.pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise DaemonError(f"no VmRSS for pid {self.pid}")

    def request(self, key: str, timeout: float = 5.0) -> str:
        return socketmap_request(self.port, key, timeout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return _tail(self.log_path)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _wait_ready(daemon: Daemon) -> None:
    """Ask the probe until it is answered NOTFOUND (bounded); record exec-to-answer time."""
    deadline = daemon.started + START_TIMEOUT
    problem = "no answer"
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise DaemonError(
                f"{daemon.kind} daemon exited with status {daemon.process.returncode}; "
                f"its log:\n{daemon.log()}"
            )
        try:
            reply = socketmap_request(daemon.port, PROBE_KEY, timeout=START_TIMEOUT)
        except OSError as exc:
            problem = f"{type(exc).__name__}: {exc}"
            time.sleep(0.002)
            continue
        if reply == "NOTFOUND ":
            daemon.ready_after = time.monotonic() - daemon.started
            return
        problem = f"probe answered {reply!r}"
        time.sleep(0.002)
    daemon.stop()
    raise DaemonError(
        f"{daemon.kind} daemon not ready within {START_TIMEOUT:.0f}s ({problem}); "
        f"its log:\n{daemon.log()}"
    )


# --------------------------------------------------------------------------------------------------
# Ours.


def ours_config(
    bed: Bed,
    port: int,
    cache: str,
    cache_path: Path | None,
    store: SharedStore | None = None,
    metrics_port: int | None = None,
) -> str:
    """Our configuration; with ``metrics_port``, ``[metrics]`` on (served on that port)."""
    j = json.dumps
    metrics = (
        "" if metrics_port is None else f'\n[metrics]\nlisten = "inet:127.0.0.1:{metrics_port}"\n'
    )
    if cache == "sqlite":
        assert cache_path is not None
        cache_lines = f'backend = "sqlite"\npath = {j(str(cache_path))}'
    elif store is not None:
        assert store.backend == cache
        name_key = "prefix" if cache == "redis" else "table"
        cache_lines = f"backend = {j(cache)}\nurl = {j(store.url)}\n{name_key} = {j(store.name)}"
    else:
        cache_lines = 'backend = "memory"'
    return f"""\
listen = [{j(f"inet:127.0.0.1:{port}")}]

[log]
level = "warning"

[dns]
nameservers = {j(bed.resolver_nameservers)}
timeout = {DNS_TIMEOUT}
lifetime = {DNS_TIMEOUT * 2}

[https]
ca_file = {j(bed.ca_file)}
timeout = {FETCH_TIMEOUT}
connect_timeout = {DNS_TIMEOUT}
allow_private_addresses = true

[cache]
{cache_lines}
txt_check_interval = {TXT_RECHECK}

[policy]
testing = "notfound"
{metrics}"""


def start_ours(
    bed: Bed,
    directory: Path,
    cache: str,
    cache_path: Path | None = None,
    wait: bool = True,
    store: SharedStore | None = None,
    metrics: bool = False,
) -> Daemon:
    """Ours; with ``metrics``, ``[metrics]`` on, checked with one scrape once it answers."""
    directory.mkdir(parents=True, exist_ok=True)
    if cache == "sqlite" and cache_path is None:
        cache_path = directory / "cache.sqlite"
    env = clean_env()
    env["PYTHONPATH"] = str(REPO)
    metrics_ports: list[int] = []

    def argv(port: int) -> list[str]:
        config = directory / "config.toml"
        metrics_port = free_port() if metrics else None
        if metrics_port is not None:
            metrics_ports.append(metrics_port)
        config.write_text(ours_config(bed, port, cache, cache_path, store, metrics_port))
        return [str(OURS_BIN), "serve", "-c", str(config)]

    daemon = _launch("ours", cache, cache_path, directory, env, argv, wait)
    if metrics and wait:
        scrape(metrics_ports[-1])
    return daemon


def scrape(port: int) -> str:
    """One scrape of our metrics endpoint, as Prometheus makes it; DaemonError when it fails."""
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
    except OSError as exc:
        raise DaemonError(f"ours: metrics at {url}: {exc}") from exc
    if "postfix_mtasts_answers_total" not in text:
        raise DaemonError(f"ours: metrics at {url}: no postfix_mtasts_answers_total")
    return text


# --------------------------------------------------------------------------------------------------
# The peer.


def ensure_peer(venv: Path) -> Path:
    """The peer's venv, created when missing and given the peer with its extras from PyPI when
    it lacks them (a venv of an earlier harness gets the Redis and PostgreSQL clients added); its
    mta-sts-daemon."""
    venv = venv.absolute()
    daemon = venv / "bin" / "mta-sts-daemon"
    python = venv / "bin" / "python"
    if daemon.exists():
        probe = subprocess.run(
            [
                str(python),
                "-c",
                f"import importlib.metadata as m, {', '.join(PEER_MODULES)};"
                "print(m.version('postfix-mta-sts-resolver'))",
            ],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == PEER_VERSION:
            return daemon
    print(f"installing {PEER_REQUIREMENT} into {venv}", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            PEER_REQUIREMENT,
        ],
        check=True,
    )
    return daemon


def peer_config(
    port: int, cache: str, cache_path: Path | None, store: SharedStore | None = None
) -> str:
    if cache == "sqlite":
        assert cache_path is not None
        cache_lines = f"  type: sqlite\n  options:\n    filename: {json.dumps(str(cache_path))}\n"
    elif store is not None:
        assert store.backend == cache
        # redis_cache.RedisCache hands `url` to redis.asyncio.from_url; postgres_cache.
        # PostgresCache hands `dsn` to asyncpg.create_pool. Both keep their 5 s timeouts.
        option = "url" if cache == "redis" else "dsn"
        cache_lines = (
            f"  type: {store.peer_type}\n  options:\n    {option}: {json.dumps(store.peer_url)}\n"
        )
    else:
        # Ours keeps every domain it was asked for; the peer's LRU default is 10000.
        cache_lines = "  type: internal\n  options:\n    cache_size: 1000000\n"
    return f"""\
host: 127.0.0.1
port: {port}
cache_grace: {TXT_RECHECK}
shutdown_timeout: 2
cache:
{cache_lines}default_zone:
  strict_testing: false
  timeout: {int(FETCH_TIMEOUT)}
  require_sni: true
"""


def start_peer(
    bed: Bed,
    peer_daemon: Path,
    directory: Path,
    cache: str,
    cache_path: Path | None = None,
    wait: bool = True,
    store: SharedStore | None = None,
) -> Daemon:
    directory.mkdir(parents=True, exist_ok=True)
    if cache == "sqlite" and cache_path is None:
        cache_path = directory / "cache.sqlite"
    resolv = directory / "resolv.conf"
    resolv.write_text("".join(f"nameserver {ns}\n" for ns in bed.resolver_nameservers))
    env = clean_env()
    env["SSL_CERT_FILE"] = bed.ca_file

    def argv(port: int) -> list[str]:
        config = directory / "config.yml"
        config.write_text(peer_config(port, cache, cache_path, store))
        # unshare -m: a private mount namespace (propagation private), so the bind mount is seen
        # by the peer alone; sh and the peer exec in turn and keep the pid.
        return [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            str(resolv),
            str(peer_daemon),
            "-v",
            "warn",
            "-c",
            str(config),
        ]

    return _launch("peer", cache, cache_path, directory, env, argv, wait)


def _launch(
    kind: str,
    cache: str,
    cache_path: Path | None,
    directory: Path,
    env: dict[str, str],
    argv: Callable[[int], list[str]],
    wait: bool,
) -> Daemon:
    """Start ``argv(port)`` on a free port, logging to daemon.log; once ready unless ``wait`` is
    False. A port taken between free_port() and the bind costs another try."""
    log_path = directory / "daemon.log"
    for _attempt in range(3):
        port = free_port()
        command = argv(port)
        with open(log_path, "ab") as log:
            started = time.monotonic()
            process = subprocess.Popen(
                command,
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        daemon = Daemon(kind, cache, port, process, log_path, cache_path, started)
        if not wait:
            return daemon
        try:
            _wait_ready(daemon)
        except DaemonError:
            if "in use" in daemon.log():
                continue
            raise
        return daemon
    raise DaemonError(f"{kind}: no free port")


def start(
    kind: str,
    bed: Bed,
    peer_daemon: Path,
    directory: Path,
    cache: str,
    cache_path: Path | None = None,
    store: SharedStore | None = None,
    metrics: bool = False,
) -> Daemon:
    """``metrics``: ``[metrics]`` on for ours (the peer has no equivalent)."""
    if kind == "ours":
        return start_ours(bed, directory, cache, cache_path, store=store, metrics=metrics)
    return start_peer(bed, peer_daemon, directory, cache, cache_path, store=store)


@contextlib.contextmanager
def stopping(*daemons: Daemon):  # type: ignore[no-untyped-def]
    try:
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()
