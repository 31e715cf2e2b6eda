"""``postfix-mtasts serve`` as a process: signals, reload, detaching, systemd, and the commands
around it (``check-config``, ``query``), against the real DNS and HTTPS servers of the bed.

Every daemon here is a subprocess of ``python -m postfix_mtasts`` with a configuration written
by the test; it is spoken to over real sockets, as Postfix would. Every wait is bounded, and every
process a test starts is stopped (killed if need be) when the test ends, also when it fails.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from bed import SCENARIOS, Bed, Response, Scenario, domain_of, policy_text

from postfix_mtasts import config
from postfix_mtasts.netstring import MAX_REPLY, Decoder, encode
from postfix_mtasts.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, "-m", "postfix_mtasts", "serve"]

# A generous bound for anything that should happen; never an assertion about speed.
PATIENCE = 10.0
# Bounded waits for the daemon's lookups against the bed.
DNS_TIMEOUT = 2.0
HTTPS_TIMEOUT = 5.0
# A parent-domain probe is answered NOTFOUND at once, without any lookup.
PROBE_KEY = ".probe.invalid"
NOTFOUND = "NOTFOUND "

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------------------
# Helpers: configuration, processes, a socketmap client.


def toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_strings(items: Sequence[str]) -> str:
    return "[" + ", ".join(toml_string(item) for item in items) + "]"


def config_text(
    bed: Bed,
    listen: Sequence[str],
    *,
    testing: str = "notfound",
    log_file: Path | None = None,
    log_level: str = "info",
    cache_path: Path | None = None,
    server: str = "",
    extra: str = "",
    ca_file: str = "",
) -> str:
    """A daemon configuration asking the bed: its resolver, its CA, loopback policy hosts."""
    log = f"level = {toml_string(log_level)}\n"
    if log_file is not None:
        log += f"file = {toml_string(str(log_file))}\n"
    cache = (
        f'backend = "sqlite"\npath = {toml_string(str(cache_path))}\n'
        if cache_path is not None
        else 'backend = "memory"\n'
    )
    return f"""\
listen = {toml_strings(listen)}

[server]
{server}
[log]
{log}
[dns]
nameservers = {toml_strings(bed.resolver_nameservers)}
timeout = {DNS_TIMEOUT}
lifetime = {DNS_TIMEOUT * 2}

[https]
ca_file = {toml_string(ca_file or bed.ca_file)}
timeout = {HTTPS_TIMEOUT}
connect_timeout = {HTTPS_TIMEOUT}
allow_private_addresses = true

[cache]
{cache}
[policy]
testing = {toml_string(testing)}
{extra}"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def secure_answer(label: str) -> str:
    """The reply for a scenario's enforced policy: Postfix's ``.domain`` for ``*.domain``."""
    patterns = [mx[1:] if mx.startswith("*.") else mx for mx in SCENARIOS[label].mx]
    return f"OK secure match={':'.join(patterns)} servername=hostname"


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for(
    what: str,
    condition: Callable[[], object],
    timeout: float = PATIENCE,
    show: Callable[[], str] | None = None,
) -> None:
    """Poll `condition` until it is true; fail naming `what` after `timeout` seconds (with
    what `show` returns, such as the daemon's log)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            shown = f":\n{show()}" if show is not None else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{shown}")
        time.sleep(0.02)


Address = tuple[str, int] | str


class Client:
    """One persistent socketmap connection, like Postfix's."""

    def __init__(self, address: Address, timeout: float = PATIENCE) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
        except BaseException:
            self.sock.close()
            raise
        self._decoder = Decoder(MAX_REPLY)
        self._replies: list[bytes] = []

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def request(self, key: str, name: str = "postfix") -> None:
        self.send(encode(f"{name} {key}".encode()))

    def reply(self) -> str:
        while not self._replies:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self._replies.extend(self._decoder.feed(data))
        return self._replies.pop(0).decode()

    def ask(self, key: str, name: str = "postfix") -> str:
        self.request(key, name)
        return self.reply()

    def closed_by_peer(self) -> bool:
        """True when the daemon closes the connection (EOF or reset) within the timeout."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refused(address: Address) -> bool:
    """True when nothing listens at `address` any more."""
    try:
        with Client(address, timeout=1.0):
            return False
    except (ConnectionRefusedError, FileNotFoundError):
        return True


def answers(address: Address) -> bool:
    try:
        with Client(address, timeout=1.0) as client:
            return client.ask(PROBE_KEY) == NOTFOUND
    except OSError:
        return False


class Serve:
    """A foreground ``postfix-mtasts serve -c FILE``; its stdout and stderr go to `output`."""

    def __init__(
        self,
        config_path: Path,
        output: Path,
        *,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.output = output
        command = argv or [*SERVE, "-c", str(config_path)]
        with open(output, "ab") as out:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=pass_fds,
                # Signals from a terminal go to pytest alone; the test sends its own.
                start_new_session=True,
            )

    @property
    def log(self) -> str:
        return read(self.output)

    def log_text(self) -> str:
        return read(self.output)

    def wait_ready(self, address: Address) -> None:
        deadline = time.monotonic() + 20.0
        while not answers(address):
            if self.process.poll() is not None:
                pytest.fail(
                    f"serve exited with status {self.process.returncode} before answering; "
                    f"its output:\n{self.log}"
                )
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"serve did not answer on {address} within 20s; its output:\n{self.log}"
                )
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = PATIENCE) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {timeout:g}s; its output:\n{self.log}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def serving(config_path: Path, output: Path, **options: Any) -> Iterator[Serve]:
    daemon = Serve(config_path, output, **options)
    try:
        yield daemon
    finally:
        daemon.kill()


def log_count(daemon: Serve, text: str) -> int:
    return daemon.log.count(text)


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postfix_mtasts", *arguments],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A short-named directory any user can enter (pytest's tmp_path is root's alone): for
    daemons that drop privileges, and for socket paths that must stay under 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="pfm-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Stopping: SIGTERM and SIGINT.


def test_sigterm_finishes_the_lookup_in_flight_then_exits_0(bed: Bed, world_dir: Path) -> None:
    # A fresh domain whose policy host answers after 2 s: its first lookup is in flight for 2 s.
    domain = bed.unique_domain("term")
    bed.add_domain(
        domain,
        Scenario(
            txt=("v=STSv1; id=term1;",),
            response=Response(body=policy_text("enforce", (f"mail.{domain}",)), delay=2.0),
        ),
    )
    host = f"mta-sts.{domain}"
    port = free_port()
    unix_path = world_dir / "s.sock"
    config_path = world_dir / "config.toml"
    config_path.write_text(config_text(bed, [f"inet:127.0.0.1:{port}", f"unix:{unix_path}"]))
    with serving(config_path, world_dir / "out.log") as daemon:
        daemon.wait_ready(("127.0.0.1", port))
        with Client(("127.0.0.1", port)) as client:
            client.request(domain)
            wait_for(f"the GET of {host}", lambda: bed.https.request_count(host) >= 1)
            daemon.signal(signal.SIGTERM)
            # New connections are refused at once, while the request in flight goes on.
            wait_for("the listener to close", lambda: refused(("127.0.0.1", port)), 1.5)
            assert client.reply() == f"OK secure match=mail.{domain} servername=hostname"
            assert client.closed_by_peer(), "the connection stays open after its last reply"
        assert daemon.wait() == 0, daemon.log
    assert not unix_path.exists(), "the unix socket file was left behind"
    assert refused(("127.0.0.1", port))
    assert "stopping: finishing requests in flight" in daemon.log
    stopped = r"stopped after \d+ requests \(0 answered from the cache, 1 network lookups\)"
    assert re.search(stopped, daemon.log), daemon.log


def test_sigint_closes_idle_connections_and_exits_0(bed: Bed, tmp_path: Path) -> None:
    port = free_port()
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_text(bed, [f"inet:127.0.0.1:{port}"]))
    with serving(config_path, tmp_path / "out.log") as daemon:
        daemon.wait_ready(("127.0.0.1", port))
        with Client(("127.0.0.1", port)) as client:
            assert client.ask(PROBE_KEY) == NOTFOUND
            daemon.signal(signal.SIGINT)
            assert client.closed_by_peer()
        assert daemon.wait() == 0, daemon.log
    assert refused(("127.0.0.1", port))
    assert "Traceback" not in daemon.log, daemon.log


# --------------------------------------------------------------------------------------------------
# SIGHUP: reload and log reopening.


def test_sighup_reloads_keeps_the_running_listener_and_survives_a_broken_file(
    bed: Bed, tmp_path: Path
) -> None:
    first, second = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
    first_spec, second_spec = f"inet:127.0.0.1:{first[1]}", f"inet:127.0.0.1:{second[1]}"
    testing = domain_of("testing")
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_text(bed, [first_spec]))
    with serving(config_path, tmp_path / "out.log") as daemon:
        daemon.wait_ready(first)
        with Client(first) as old:
            assert old.ask(testing) == NOTFOUND  # looked up
            assert old.ask(testing) == NOTFOUND  # from the cache
            assert refused(second)

            config_path.write_text(config_text(bed, [first_spec, second_spec], testing="may"))
            daemon.signal(signal.SIGHUP)
            wait_for(
                "the reload", lambda: "configuration reloaded" in daemon.log, show=daemon.log_text
            )

            # The connection made before the reload is served by the new settings.
            assert old.ask(testing) == "OK may"
            with Client(second) as new:
                assert new.ask(testing) == "OK may"
            with Client(first) as again:
                assert again.ask(testing) == "OK may"
            # The unchanged listener was neither closed nor bound again.
            assert log_count(daemon, f"listening on {first_spec} ") == 1, daemon.log
            assert f"stopped listening on {first_spec}" not in daemon.log, daemon.log
            assert log_count(daemon, f"listening on {second_spec} ") == 1, daemon.log

            # A broken file: logged, naming the file and the key; the running settings stay.
            config_path.write_text(config_text(bed, [first_spec], testing="sometimes"))
            daemon.signal(signal.SIGHUP)
            wait_for(
                "the failed reload", lambda: "reload failed" in daemon.log, show=daemon.log_text
            )
            failure = next(line for line in daemon.log.splitlines() if "reload failed" in line)
            assert str(config_path) in failure
            assert "policy.testing" in failure
            assert old.ask(testing) == "OK may"
            with Client(second) as new:
                assert new.ask(testing) == "OK may"
            assert daemon.process.poll() is None
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.log


def test_sighup_reopens_the_log_file(bed: Bed, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "daemon.log"
    rotated = tmp_path / "daemon.log.1"
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_text(bed, [f"inet:127.0.0.1:{port}"], log_file=log_path))
    with serving(config_path, tmp_path / "out.log") as daemon:
        daemon.wait_ready(("127.0.0.1", port))
        assert "ready" in read(log_path)
        log_path.rename(rotated)
        daemon.signal(signal.SIGHUP)
        wait_for(
            "a new log file",
            lambda: "configuration reloaded" in read(log_path),
            show=lambda: read(rotated) + daemon.log,
        )
        enforce = domain_of("enforce")
        with Client(("127.0.0.1", port)) as client:
            assert client.ask(enforce) == secure_answer("enforce")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.log
    new, old = read(log_path), read(rotated)
    assert f"{enforce}: enforce policy" in new, new
    assert "stopped after" in new, new
    assert "ready" in old and "configuration reloaded" not in old and enforce not in old, old
    assert daemon.log == "", "with a log file, nothing goes to stderr"


def test_log_file_that_cannot_be_reopened_on_sighup_is_reported_and_logging_goes_on(
    bed: Bed, tmp_path: Path
) -> None:
    # As after logrotate when the daemon may no longer create files where its log lives (it
    # dropped privileges): here the log's directory is gone when SIGHUP comes.
    port = free_port()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log_path = log_dir / "daemon.log"
    moved = tmp_path / "logs.old" / "daemon.log"
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_text(bed, [f"inet:127.0.0.1:{port}"], log_file=log_path))
    with serving(config_path, tmp_path / "out.log") as daemon:
        daemon.wait_ready(("127.0.0.1", port))
        log_dir.rename(moved.parent)
        daemon.signal(signal.SIGHUP)

        def visible() -> str:
            return read(moved) + daemon.log

        wait_for(
            "an error naming the log file",
            lambda: any(
                str(log_path) in line and "ERROR" in line for line in visible().splitlines()
            ),
            show=visible,
        )
        enforce = domain_of("enforce")
        with Client(("127.0.0.1", port)) as client:
            assert client.ask(enforce) == secure_answer("enforce")
        # Lookups are still logged: into the old file, or to stderr.
        wait_for(
            "the lookup's log line", lambda: f"{enforce}: enforce policy" in visible(), show=visible
        )
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, visible()


# --------------------------------------------------------------------------------------------------
# --daemon: detaching, the pid file, dropping privileges.


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict; empty when the process is gone (or only a zombie is left:
    the detached daemon's parent is init, which may be slow to reap it)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return {} if fields.get("State", "").startswith(("Z", "X")) else fields


@contextlib.contextmanager
def detached_daemon(config_path: Path, pid_path: Path, log_path: Path) -> Iterator[int]:
    """Run ``serve --daemon``; yield the daemon's pid (from its pid file); kill it at the end
    if the test has not stopped it. `log_path` is the daemon's ``[log] file``."""
    output = log_path.with_name("out.log")
    with open(output, "ab") as out:
        parent = subprocess.Popen(
            [*SERVE, "--daemon", "--pid-file", str(pid_path), "-c", str(config_path)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        status = parent.wait(PATIENCE)
    except subprocess.TimeoutExpired:
        parent.kill()
        parent.wait()
        pytest.fail(f"serve --daemon did not return within {PATIENCE:g}s")
    assert status == 0, read(output)
    assert read(output) == "", "the detached daemon wrote to the parent's stdout or stderr"
    deadline = time.monotonic() + PATIENCE
    while not read(pid_path).endswith("\n"):
        if time.monotonic() >= deadline:
            pytest.fail(
                f"no pid file {pid_path} within {PATIENCE:g}s; the daemon's log:\n"
                f"{read(log_path) or '(empty)'}"
            )
        time.sleep(0.02)
    pid = int(read(pid_path))
    try:
        assert pid != parent.pid, "the pid file names the parent, which exited"
        yield pid
    finally:
        if proc_status(pid):
            os.kill(pid, signal.SIGKILL)


def unreadable_by_others() -> list[str]:
    """Directories of the interpreter and of this code that a user other than root cannot
    read: a daemon that dropped privileges cannot import modules from there any more."""
    import postfix_mtasts

    found = []
    for path in {os.path.dirname(os.__file__), os.path.dirname(postfix_mtasts.__file__)}:
        parts = Path(os.path.realpath(path)).parts
        for depth in range(2, len(parts) + 1):
            directory = Path(*parts[:depth])
            if directory.stat().st_mode & 0o005 != 0o005:
                found.append(str(directory))
                break
    return found


def wait_until_answering(address: Address, pid: int, log_path: Path) -> None:
    deadline = time.monotonic() + PATIENCE
    while not answers(address):
        if not proc_status(pid):
            hidden = unreadable_by_others()
            hint = (
                f"\n(note: {', '.join(hidden)} cannot be read by other users: a daemon that "
                "dropped privileges cannot import modules from there)"
                if hidden
                else ""
            )
            pytest.fail(f"the daemon ({pid}) exited; its log:\n{read(log_path)}{hint}")
        if time.monotonic() >= deadline:
            pytest.fail(f"the daemon ({pid}) does not answer; its log:\n{read(log_path)}")
        time.sleep(0.05)


def stop_detached(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    wait_for(f"daemon {pid} to exit", lambda: not proc_status(pid))


def test_daemon_detaches_writes_its_pid_file_and_removes_it_on_sigterm(
    bed: Bed, world_dir: Path
) -> None:
    port = free_port()
    log_path = world_dir / "daemon.log"
    pid_path = world_dir / "serve.pid"
    config_path = world_dir / "config.toml"
    config_path.write_text(
        config_text(
            bed,
            [f"inet:127.0.0.1:{port}"],
            log_file=log_path,
            cache_path=world_dir / "cache" / "cache.sqlite",
        )
    )
    with detached_daemon(config_path, pid_path, log_path) as pid:
        assert proc_status(pid), f"the pid in the pid file ({pid}) is not running"
        wait_until_answering(("127.0.0.1", port), pid, log_path)
        with Client(("127.0.0.1", port)) as client:
            assert client.ask(domain_of("enforce")) == secure_answer("enforce")
        assert os.getsid(pid) != os.getsid(0), "the daemon did not leave our session"
        stop_detached(pid)
    assert not pid_path.exists(), "the pid file was left behind"
    assert refused(("127.0.0.1", port))
    text = read(log_path)
    assert "ready" in text and "stopped after" in text, text
    assert "ERROR" not in text, text


def test_daemon_drops_privileges_after_binding(bed: Bed, world_dir: Path) -> None:
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    port = free_port()
    unix_path = world_dir / "s.sock"
    log_path = world_dir / "daemon.log"
    # A pid file directory that does not exist yet is created for the daemon's user, so that it
    # can remove its pid file after dropping privileges.
    pid_path = world_dir / "run" / "serve.pid"
    cache_dir = world_dir / "cache"
    cache_path = cache_dir / "cache.sqlite"
    # The bed's CA file is in a directory of root's alone: give the daemon a copy it can read.
    ca_file = shutil.copy(bed.ca_file, world_dir / "ca.pem")
    # A cache left by an earlier run as root: the daemon must hand it over to its user.
    SqliteStore(str(cache_path)).close()
    assert cache_path.stat().st_uid == 0
    config_path = world_dir / "config.toml"
    config_path.write_text(
        config_text(
            bed,
            [f"inet:127.0.0.1:{port}", f"unix:{unix_path}"],
            log_file=log_path,
            cache_path=cache_path,
            server='user = "nobody"\ngroup = "nogroup"\n',
            ca_file=str(ca_file),
        )
    )
    with detached_daemon(config_path, pid_path, log_path) as pid:
        # Answering means bound, detached, privileges dropped, cache opened, serving.
        wait_until_answering(("127.0.0.1", port), pid, log_path)
        status = proc_status(pid)
        assert status["Uid"].split() == [str(nobody)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(nogroup)] * 4, status["Gid"]
        # No supplementary group of root's is left (initgroups may give nogroup itself).
        assert set(status["Groups"].split()) <= {str(nogroup)}, status["Groups"]
        # The unix socket was created as root before the drop; it is still served.
        assert unix_path.stat().st_uid == 0
        enforce = domain_of("enforce")
        with Client(str(unix_path)) as client:
            assert client.ask(enforce) == secure_answer("enforce")
        with Client(("127.0.0.1", port)) as client:
            assert client.ask(enforce) == secure_answer("enforce")
        assert cache_dir.stat().st_uid == nobody
        assert cache_path.stat().st_uid == nobody
        text = read(log_path)
        assert "running as user nobody" in text, text
        assert "ERROR" not in text, text
        stop_detached(pid)
    text = read(log_path)
    assert "ERROR" not in text, text
    # The lookup went to the SQLite cache, not to a memory stand-in.
    store = SqliteStore(str(cache_path))
    try:
        entry = store.get(enforce)
    finally:
        store.close()
    assert entry is not None and entry.record_id == SCENARIOS["enforce"].record_id
    assert not pid_path.exists(), "the pid file was left behind after dropping privileges"


# --------------------------------------------------------------------------------------------------
# systemd: readiness notification and socket activation.


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_notify_ready_reloading_and_stopping(
    bed: Bed, world_dir: Path, abstract: bool
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with notify:
        if abstract:
            name = f"pfm-notify-{os.getpid()}-{time.monotonic_ns()}"
            notify.bind("\0" + name)
            notify_socket = "@" + name
        else:
            notify_socket = str(world_dir / "notify")
            notify.bind(notify_socket)
        notify.settimeout(20.0)

        def message() -> str:
            # The assignments of the next message but STATUS= (the daemon's one-line summary,
            # sent with READY=1 and STOPPING=1 and every few seconds: tests/test_systemd.py).
            while True:
                lines = notify.recv(4096).decode().splitlines()
                kept = [line for line in lines if not line.startswith("STATUS=")]
                if kept:
                    return "\n".join(kept)

        port = free_port()
        config_path = world_dir / "config.toml"
        config_path.write_text(config_text(bed, [f"inet:127.0.0.1:{port}"]))
        env = {**os.environ, "NOTIFY_SOCKET": notify_socket}
        with serving(config_path, world_dir / "out.log", env=env) as daemon:
            assert message() == "READY=1", daemon.log
            # Ready means listening: the first connection is answered.
            with Client(("127.0.0.1", port)) as client:
                assert client.ask(PROBE_KEY) == NOTFOUND
            notify.settimeout(PATIENCE)
            daemon.signal(signal.SIGHUP)
            assert message() == "RELOADING=1"
            assert message() == "READY=1"
            daemon.signal(signal.SIGTERM)
            assert message() == "STOPPING=1"
            assert daemon.wait() == 0, daemon.log
        assert "cannot notify" not in daemon.log, daemon.log


# The way systemd starts a socket-activated service: the listening sockets from fd 3 on,
# LISTEN_FDS, and LISTEN_PID naming the service's own process (known only after fork).
_ACTIVATE = """\
import os, sys
fd = int(os.environ.pop("TEST_LISTEN_FD"))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "postfix_mtasts", *sys.argv[1:]])
"""


def test_systemd_socket_activation_serves_the_passed_socket(bed: Bed, tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_text(bed, ["systemd"]))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        address = listening.getsockname()
        env = {**os.environ, "TEST_LISTEN_FD": str(listening.fileno())}
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        argv = [sys.executable, "-c", _ACTIVATE, "serve", "-c", str(config_path)]
        with serving(
            config_path, tmp_path / "out.log", env=env, argv=argv, pass_fds=[listening.fileno()]
        ) as daemon:
            daemon.wait_ready(address)
            with Client(address) as client:
                assert client.ask(domain_of("enforce")) == secure_answer("enforce")
                assert client.ask(domain_of("norecord")) == NOTFOUND
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0, daemon.log
    assert "listening on systemd" in daemon.log, daemon.log


def test_systemd_listener_without_sockets_for_this_process_is_an_error(tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text('listen = ["systemd"]\n[cache]\nbackend = "memory"\n')
    # LISTEN_PID names another process (ours): the sockets are not the daemon's to take.
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())}
    with serving(config_path, tmp_path / "out.log", env=env) as daemon:
        assert daemon.wait() == 2, daemon.log
    assert "listener 'systemd'" in daemon.log, daemon.log


# --------------------------------------------------------------------------------------------------
# check-config.


def test_check_config_prints_the_effective_settings_as_toml(tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        """\
listen = ["inet:127.0.0.1:18461", "unix:/run/postfix-mtasts/socket"]
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = 2.5
[cache]
backend = "memory"
path = "/var/tmp/cache.sqlite"
[policy]
testing = "may"
[maps.strict]
testing = "secure"
"""
    )
    result = run_cli("check-config", "-c", str(config_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = tomllib.loads(result.stdout)
    assert config.loads(result.stdout) == config.load(str(config_path))
    assert printed["listen"] == ["inet:127.0.0.1:18461", "unix:/run/postfix-mtasts/socket"]
    assert printed["dns"]["nameservers"] == ["127.0.0.1:5353"]
    assert printed["dns"]["timeout"] == 2.5
    assert printed["policy"]["testing"] == "may"
    assert printed["maps"]["strict"]["testing"] == "secure"
    # Effective settings: the defaults of the keys the file does not set are shown too.
    assert printed["server"]["max_connections"] == 1000
    assert printed["https"]["allow_private_addresses"] is False


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[policy]\ntestnig = "may"\n', "policy.testnig"),
        ('lisen = ["inet:127.0.0.1:8461"]\n', "lisen"),
        ('[dns]\ntimeout = "fast"\n', "dns.timeout"),
        ('[maps.strict]\ntesting = "always"\n', "maps.strict.testing"),
        ("[server]\nmax_connections = 1.5\n", "server.max_connections"),
    ],
    ids=["unknown-key", "unknown-top-level-key", "wrong-type", "bad-choice", "not-an-integer"],
)
def test_check_config_names_the_file_and_the_key(tmp_path: Path, text: str, key: str) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(text)
    result = run_cli("check-config", "-c", str(config_path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config_path) in lines[0] and key in lines[0], lines[0]


def test_check_config_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run_cli("check-config", "-c", str(missing))
    assert result.returncode == 2
    assert result.stdout == ""
    assert str(missing) in result.stderr, result.stderr


def test_serve_with_a_broken_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text('[policy]\ntesting = "sometimes"\n')
    result = run_cli("serve", "-c", str(config_path))
    assert result.returncode == 2
    assert str(config_path) in result.stderr and "policy.testing" in result.stderr


# --------------------------------------------------------------------------------------------------
# query with a configuration file.


@pytest.mark.parametrize(
    ("label", "options", "answer"),
    [
        ("enforce", (), secure_answer("enforce")),
        ("testing", (), NOTFOUND),
        ("testing", ("--map", "strict"), secure_answer("testing")),
        ("testing", ("--map", "opportunistic"), "OK may"),
        ("testing", ("--map", "unknown"), NOTFOUND),
    ],
    ids=["enforce", "testing", "testing-strict", "testing-opportunistic", "testing-unknown-map"],
)
def test_query_prints_the_postfix_answer_of_the_map(
    bed: Bed, tmp_path: Path, label: str, options: tuple[str, ...], answer: str
) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        config_text(
            bed,
            ["inet:127.0.0.1:8461"],
            extra='[maps.strict]\ntesting = "secure"\n[maps.opportunistic]\ntesting = "may"\n',
        )
    )
    result = run_cli("query", "-c", str(config_path), *options, domain_of(label))
    assert result.returncode == 0, result
    assert f"  postfix answer: {answer}\n" in result.stdout, result.stdout


# --------------------------------------------------------------------------------------------------
# Logging.

_LOOKUP_LINE = re.compile(r" INFO (?P<domain>\S+): (?P<outcome>.+) \((?P<ms>\d+) ms\)$")


def test_one_info_line_per_network_lookup_and_none_for_cached_answers(
    bed: Bed, tmp_path: Path
) -> None:
    port = free_port()
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_text(bed, [f"inet:127.0.0.1:{port}"], log_level="info"))
    enforce, norecord = domain_of("enforce"), domain_of("norecord")
    with serving(config_path, tmp_path / "out.log") as daemon:
        daemon.wait_ready(("127.0.0.1", port))
        with Client(("127.0.0.1", port)) as client:
            for _ in range(3):
                assert client.ask(enforce) == secure_answer("enforce")
                assert client.ask(norecord) == NOTFOUND
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.log
    lookups = [m for line in daemon.log.splitlines() if (m := _LOOKUP_LINE.search(line))]
    by_domain = {m["domain"]: m for m in lookups}
    assert sorted(m["domain"] for m in lookups) == sorted([enforce, norecord]), daemon.log
    enforce_id = SCENARIOS["enforce"].record_id
    assert by_domain[enforce]["outcome"] == f"enforce policy, id {enforce_id}"
    assert by_domain[norecord]["outcome"].startswith("no policy"), by_domain[norecord]["outcome"]
    assert "(4 answered from the cache, 2 network lookups)" in daemon.log, daemon.log
    # Nothing else at info level names the domains: the cached answers are silent.
    for domain in (enforce, norecord):
        lines = [line for line in daemon.log.splitlines() if domain in line]
        assert len(lines) == 1, lines


# --------------------------------------------------------------------------------------------------
# Bad input on the wire.


@pytest.fixture(scope="module")
def wire_daemon(bed: Bed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Address]:
    directory = tmp_path_factory.mktemp("wire")
    port = free_port()
    config_path = directory / "config.toml"
    config_path.write_text(config_text(bed, [f"inet:127.0.0.1:{port}"]))
    with serving(config_path, directory / "out.log") as daemon:
        daemon.wait_ready(("127.0.0.1", port))
        yield ("127.0.0.1", port)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.log


@pytest.mark.parametrize(
    "payload",
    [b"nokey", b"postfix ", b" example.com", "postfix ex\u00e4mple".encode("latin-1")],
    ids=["no-space", "empty-key", "empty-name", "not-utf8"],
)
def test_bad_request_is_answered_perm_and_the_connection_goes_on(
    wire_daemon: Address, payload: bytes
) -> None:
    with Client(wire_daemon) as client:
        client.send(encode(payload))
        assert client.reply().startswith("PERM "), payload
        assert client.ask(PROBE_KEY) == NOTFOUND
        assert client.ask(domain_of("norecord")) == NOTFOUND


@pytest.mark.parametrize(
    "raw", [b"10001:", b"99999999999:", b"x:abc,", b"3:abcX"], ids=["over", "huge", "bad", "comma"]
)
def test_broken_frame_closes_the_connection(wire_daemon: Address, raw: bytes) -> None:
    with Client(wire_daemon) as client:
        assert client.ask(PROBE_KEY) == NOTFOUND
        client.send(raw)
        assert client.closed_by_peer(), raw
    assert answers(wire_daemon), "the daemon stopped answering other connections"
