"""Real Redis and PostgreSQL servers for the shared-store tests, started once per test run.

``redis_server`` and ``postgres_server`` (session fixtures, registered by tests/conftest.py) run
Debian's ``redis-server`` and PostgreSQL (``initdb``, ``postgres``) on loopback, in temporary
directories, with the data on no disk that matters (no fsync, no snapshots). Each server also
accepts a user ``fleet`` with the password ``PASSWORD``, so that tests can check that a password
never reaches a log or a command's output. A server that cannot start fails the tests that use it:
on CI a missing server is a broken machine, not a reason to skip.

Tests that stop a server in the middle of a run (the outage tests) use ``stop()`` and ``start()``,
which keep the port and the data directory, or ``pause()``/``resume()`` (SIGSTOP/SIGCONT: a server
that accepts connections and never answers).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 30.0
PASSWORD = "fleet-secret-4711"


class ServerError(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{what} exited with {process.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"{what} did not listen on port {port} within {START_TIMEOUT:.0f}s")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _private_dir(prefix: str, owner: str | None) -> Path:
    """A directory under /tmp (pytest's own is closed to other users) owned by ``owner``."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` and on the unix socket ``socket_path``."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("redis-server not found (Debian package redis-server)")
        self.binary = binary
        self.dir = _private_dir("mtasts-redis-", None)
        self.port = free_port()
        self.socket_path = str(self.dir / "redis.sock")
        self.log = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def password_url(self) -> str:
        return f"redis://fleet:{PASSWORD}@127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self) -> None:
        config = self.dir / "redis.conf"
        config.write_text(
            f'port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nsave ""\nappendonly no\n'
            f"unixsocket {self.socket_path}\nunixsocketperm 700\ndaemonize no\n"
            f"user fleet on >{PASSWORD} ~* &* +@all\n"
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        _wait_for_port(self.port, self.process, self.log, "redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _postgres_bin(name: str) -> str:
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return found[-1]
    binary = shutil.which(name)
    if binary is None:
        raise ServerError(f"{name} not found (Debian package postgresql)")
    return binary


class PostgresServer:
    """A PostgreSQL cluster of its own on 127.0.0.1:``port`` (and a socket in ``socket_dir``),
    with a database ``mtasts``. As root it runs as the ``postgres`` user (PostgreSQL refuses
    root)."""

    database = "mtasts"

    def __init__(self) -> None:
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user is not None:
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                raise ServerError("no postgres user (Debian package postgresql)") from None
        self.initdb = _postgres_bin("initdb")
        self.postgres = _postgres_bin("postgres")
        self.dir = _private_dir("mtasts-postgres-", self.user)
        self.data = self.dir / "data"
        self.socket_dir = str(self.dir)
        self.port = free_port()
        self.log = self.dir / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def password_url(self) -> str:
        return f"postgresql://fleet:{PASSWORD}@127.0.0.1:{self.port}/{self.database}"

    @property
    def socket_url(self) -> str:
        """The connection-string form, over the unix socket."""
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={self.database}"

    def _as_owner(self, argv: list[str]) -> list[str]:
        if self.user is None:
            return argv
        # setpriv execs the command itself (runuser would stay as its parent): the process
        # started is the postmaster, which stop() and pause() signal.
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", *argv]

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(
            self._as_owner(argv), capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise ServerError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout}")

    def start(self) -> None:
        if not self._initialised:
            self._run(
                [self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"]
            )
            with (self.data / "pg_hba.conf").open("w") as hba:
                hba.write(
                    "local all all trust\n"
                    "host all fleet 127.0.0.1/32 scram-sha-256\n"
                    "host all all 127.0.0.1/32 trust\n"
                )
            self._initialised = True
            first = True
        else:
            first = False
        argv = self._as_owner(
            [
                self.postgres,
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                self.socket_dir,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ]
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_port(self.port, self.process, self.log, "postgres")
        # The server accepts connections a moment before it accepts logins ("the database system
        # is starting up"), after a restart as after the first start.
        self._wait_for_logins()
        if first:
            self._setup()

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            self._as_owner(
                [
                    "psql",
                    "-X",
                    "-q",
                    "-t",
                    "-A",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    self.socket_dir,
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-d",
                    database,
                    "-c",
                    sql,
                ]
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(f"psql {sql!r}: {done.stderr.strip()}")
        return done.stdout

    def _wait_for_logins(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.psql("SELECT 1")
                return
            except ServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _setup(self) -> None:
        self.psql(f"CREATE DATABASE {self.database}")
        self.psql(f"CREATE ROLE fleet LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"GRANT ALL ON DATABASE {self.database} TO fleet")
        self.psql("GRANT ALL ON SCHEMA public TO fleet", self.database)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            # SIGINT: PostgreSQL's "fast" shutdown (disconnects clients, no waiting).
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Stop every process of the cluster (postmaster and backends) without closing a
        socket: connections stay open and nothing answers."""
        assert self.process is not None
        self._signal_cluster(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self._signal_cluster(signal.SIGCONT)

    def _signal_cluster(self, sig: signal.Signals) -> None:
        assert self.process is not None
        pids = [self.process.pid]
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            pids += [int(p) for p in children.read_text().split()]
        except OSError:
            pass
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
