"""The promise that matters most, attacked: a domain known to be protected is never downgraded.

Each test is an attack (or a fault) found against an earlier version (issue 10), tried again the
way an attacker or a bad day would try it, against real servers: the bed's knot, unbound and
HTTPS policy hosts, a DNS server in front of them that an attacker controls (tests/hostile_dns.py),
a real ``postfix-mtasts serve`` and real SQLite files on real (read-only, full) file systems.
The limits are configured small so that the floods stay small.

- a stored policy waits on DNS after a restart (a slow CNAME chain, a hanging resolver);
- a cache that cannot be written is not read either (read-only directory, read-only file system,
  full disk);
- local exhaustion (file descriptors, too many lookups at once) becomes a remote verdict;
- memory grows with what clients send (map names, domains);
- a file that is not our cache is moved aside as "damaged".
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bed import Bed, policy_text
from cachefiles import damaged_cache
from hostile_dns import HostileDNS, wait_for
from mtasts_daemon import REPO, Daemon, netstring, running_daemon

from postfix_mtasts.config import Config
from postfix_mtasts.resolver import DNSTemporaryError, Resolver
from postfix_mtasts.service import descriptors_needed
from postfix_mtasts.store import Entry
from postfix_mtasts.store.sqlite import SqliteStore

NOTFOUND = "NOTFOUND "


def secure(domain: str) -> str:
    return f"OK secure match=mail.{domain} servername=hostname"


def publish_enforce(bed: Bed, prefix: str) -> str:
    """A fresh domain with an enforce policy for mail.<domain>, served by the bed."""
    domain = bed.unique_domain(prefix)
    bed.dns_set(f"mta-sts.{domain}", "A", [bed.https_address])
    bed.dns_set(f"_mta-sts.{domain}", "TXT", ["v=STSv1; id=1"])
    bed.https.set(f"mta-sts.{domain}", body=policy_text("enforce", (f"mail.{domain}",), 86400))
    return domain


def log_lines(daemon: Daemon, pattern: str) -> list[str]:
    text = daemon.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if re.search(pattern, line)]


# --------------------------------------------------------------------------------------------------
# 1. After a restart, a stored policy waits on DNS.


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "asyncio"])
def test_one_dns_question_has_one_lifetime_cname_hops_included(
    hostile_dns: HostileDNS, bed: Bed, asynchronous: bool
) -> None:
    # Six CNAME hops, each answered 1 s late: every hop is within the 2 s timeout, the whole
    # chain is not within the 3 s lifetime. An attacker on the path must not stretch one
    # question to hops x lifetime.
    name = f"_mta-sts.{bed.unique_domain('chain')}"
    hostile_dns.cname_chain(name, hops=6, seconds=1.0, txt="v=STSv1; id=chained")
    resolver = Resolver([hostile_dns.address], timeout=2.0, lifetime=3.0)
    try:
        started = time.monotonic()
        with pytest.raises(DNSTemporaryError, match=r"timed out after 3\.0s"):
            if asynchronous:
                asyncio.run(resolver.txt_async(name))
            else:
                resolver.txt(name)
        assert time.monotonic() - started < 5.0
    finally:
        hostile_dns.clear(name)


@pytest.mark.parametrize("attack", ["slow-cname-chain", "hanging-resolver"])
def test_a_stored_policy_is_answered_at_once_after_a_restart_whatever_dns_does(
    bed: Bed, hostile_dns: HostileDNS, tmp_path: Path, attack: str
) -> None:
    domain = publish_enforce(bed, "restart")
    txt_name = f"_mta-sts.{domain}"
    settings = {
        # The TXT check of a stored policy is due a second after it was made.
        "cache": {"txt_check_interval": 1, "first_lookup_deadline": 6},
        "dns": {"timeout": 2, "lifetime": 4},
    }
    with running_daemon(
        bed, tmp_path / "first", sqlite=True, nameservers=[hostile_dns.address], settings=settings
    ) as first:
        assert first.request(domain) == secure(domain)
    cache = tmp_path / "first" / "cache.sqlite"
    time.sleep(1.2)
    if attack == "slow-cname-chain":
        hostile_dns.cname_chain(txt_name, hops=6, seconds=1.5, txt="v=STSv1; id=1")
    else:
        hostile_dns.hang(txt_name)
    try:
        settings["cache"]["path"] = str(cache)
        settings["cache"]["backend"] = "sqlite"
        with running_daemon(
            bed, tmp_path / "second", nameservers=[hostile_dns.address], settings=settings
        ) as second:
            # After the restart the attacker holds DNS back: the stored policy is the answer,
            # at once (well before first_lookup_deadline, after which NOTFOUND would come).
            assert second.request(domain, timeout=3.0) == secure(domain)
            # ... and the check it was due for runs behind the answer.
            assert wait_for(lambda: hostile_dns.queries(txt_name) > 0, 5.0)
            assert second.request(domain, timeout=3.0) == secure(domain)
    finally:
        hostile_dns.clear(txt_name)


# --------------------------------------------------------------------------------------------------
# 2. A cache that cannot be written is not read either.


def _learn(bed: Bed, directory: Path, cache_dir: Path, domain: str) -> None:
    """A daemon (root, DNS working) learns ``domain``'s policy into cache_dir/cache.sqlite."""
    settings = {"cache": {"backend": "sqlite", "path": str(cache_dir / "cache.sqlite")}}
    with running_daemon(bed, directory, settings=settings) as daemon:
        assert daemon.request(domain) == secure(domain)


def _ask_with_dns_down(
    bed: Bed,
    directory: Path,
    cache_dir: Path,
    domain: str,
    *,
    wrapper: list[str] | None = None,
) -> None:
    """With DNS down and a cache that cannot be written, the stored enforce policy is answered;
    new domains are looked up (and fail), and the failed writes are logged once, not per
    request."""
    settings: dict[str, dict[str, object]] = {
        "cache": {
            "backend": "sqlite",
            "path": str(cache_dir / "cache.sqlite"),
            "first_lookup_deadline": 3,
        },
        "dns": {"timeout": 0.5, "lifetime": 1},
    }
    with running_daemon(
        bed,
        directory,
        nameservers=[bed.dead_nameserver],
        settings=settings,
        wrapper=wrapper or (),
    ) as daemon:
        assert daemon.request(domain) == secure(domain)
        for n in range(5):
            assert daemon.request(bed.unique_domain(f"new{n}-"), timeout=6.0) == NOTFOUND
        assert daemon.request(domain) == secure(domain)
        assert not log_lines(daemon, "cannot open the cache"), daemon.log()
        assert len(log_lines(daemon, "cannot write the cache")) == 1, daemon.log()


# The daemon runs as root without the capabilities that let root write where the permissions
# say no: the file's and the directory's mode bits then apply to it as to any user. (Running it
# as another user is not possible on every test machine: Python may live in root's home.)
NO_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_a_read_only_cache_directory_is_still_read(bed: Bed, tmp_path: Path) -> None:
    domain = publish_enforce(bed, "rodir")
    cache_dir = tmp_path / "cache"
    _learn(bed, tmp_path / "learn", cache_dir, domain)
    assert not list(cache_dir.glob("*-wal")), "the first daemon left its WAL behind"
    (cache_dir / "cache.sqlite").chmod(0o444)
    cache_dir.chmod(0o555)
    try:
        _ask_with_dns_down(bed, tmp_path / "run", cache_dir, domain, wrapper=NO_DAC_OVERRIDE)
    finally:
        cache_dir.chmod(0o755)


def test_a_cache_on_a_read_only_file_system_is_still_read(bed: Bed, tmp_path: Path) -> None:
    domain = publish_enforce(bed, "rofs")
    cache_dir = tmp_path / "cache"
    _learn(bed, tmp_path / "learn", cache_dir, domain)
    # The daemon runs in a mount namespace of its own where the cache directory is read-only.
    remount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    wrapper = ["unshare", "--mount", "sh", "-c", remount, str(cache_dir)]
    _ask_with_dns_down(bed, tmp_path / "run", cache_dir, domain, wrapper=wrapper)


def test_a_cache_on_a_full_disk_is_still_read(bed: Bed, tmp_path: Path) -> None:
    domain = publish_enforce(bed, "fulldisk")
    cache_dir = tmp_path / "cache"
    _learn(bed, tmp_path / "learn", cache_dir, domain)
    stash = tmp_path / "stash"
    stash.mkdir()
    shutil.copy(cache_dir / "cache.sqlite", stash)
    # In a mount namespace of its own, the cache directory is a small file system holding the
    # cache file, filled up to the last byte.
    fill = (
        'mount -t tmpfs -o size=512k tmpfs "$0" && cp "$1"/cache.sqlite "$0"/'
        ' && { dd if=/dev/zero of="$0"/filler bs=4k 2>/dev/null || true; }'
        ' && shift && exec "$@"'
    )
    wrapper = ["unshare", "--mount", "sh", "-c", fill, str(cache_dir), str(stash)]
    _ask_with_dns_down(bed, tmp_path / "run", cache_dir, domain, wrapper=wrapper)


def test_a_read_only_store_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    store = SqliteStore(str(path))
    entry = Entry("ro.example", "1", "version: STSv1\n", 1.0, 2e9, 1.0, 1.0)
    store.put(entry)
    store.close()
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        code = (
            "from postfix_mtasts.store.sqlite import SqliteStore\n"
            "from postfix_mtasts.store import Entry, StoreError\n"
            f"s = SqliteStore({str(path)!r})\n"
            "print('read_only' if s.read_only else 'writable')\n"
            "print(s.get('ro.example').record_id)\n"
            "try:\n"
            "    s.put(Entry('new.example', None, None, None, None, None, 1.0))\n"
            "except StoreError as exc:\n"
            "    print('refused:', exc)\n"
        )
        result = subprocess.run(
            [*NO_DAC_OVERRIDE, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
            check=False,
        )
    finally:
        tmp_path.chmod(0o755)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["read_only", "1"], result.stdout
    assert lines[2].startswith(f"refused: {path}: cannot store new.example: opened read-only")


# --------------------------------------------------------------------------------------------------
# 3. Local exhaustion becomes a remote verdict.


class Flood:
    """Connections that pipeline lookups of names whose DNS hangs, and never read a reply."""

    def __init__(self, daemon: Daemon, suffix: str, connections: int, per_connection: int):
        self.sockets: list[socket.socket] = []
        for c in range(connections):
            sock = socket.create_connection((daemon.host, daemon.port), timeout=5)
            payload = b"".join(
                netstring(f"postfix f{c}-{n}.{suffix}".encode()) for n in range(per_connection)
            )
            sock.sendall(payload)
            self.sockets.append(sock)

    def stop(self) -> None:
        for sock in self.sockets:
            sock.close()


class Client:
    """One socketmap connection kept open, as Postfix's smtp processes keep theirs."""

    def __init__(self, daemon: Daemon) -> None:
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=15)
        self.data = b""

    def ask(self, key: str) -> str:
        self.sock.sendall(netstring(f"postfix {key}".encode()))
        while True:
            length, colon, rest = self.data.partition(b":")
            if colon and len(rest) > int(length):
                self.data = rest[int(length) + 1 :]
                return rest[: int(length)].decode()
            chunk = self.sock.recv(65536)
            assert chunk, "the daemon closed the connection"
            self.data += chunk

    def close(self) -> None:
        self.sock.close()


def _never_notfound(client: Client, domain: str, seconds: float) -> list[str]:
    """Ask for ``domain`` until it is found or ``seconds`` passed; every reply (a NOTFOUND among
    them fails the test)."""
    replies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reply = client.ask(domain)
        replies.append(reply)
        assert reply != NOTFOUND, replies
        if reply.startswith("OK"):
            break
        time.sleep(0.2)
    return replies


@pytest.mark.parametrize("shortage", ["file-descriptors", "lookup-turns"])
def test_local_exhaustion_never_becomes_a_remote_verdict(
    bed: Bed, hostile_dns: HostileDNS, tmp_path: Path, shortage: str
) -> None:
    flood_zone = f"{bed.unique_domain('flood')}"
    hostile_dns.hang(flood_zone)
    settings: dict[str, dict[str, object]] = {
        "server": {"max_connections": 40},
        "cache": {"first_lookup_deadline": 4},
        "dns": {"timeout": 2, "lifetime": 4},
    }
    wrapper: list[str] = []
    if shortage == "file-descriptors":
        # Fewer descriptors than the lookups take (the hard limit too: it cannot be raised).
        wrapper = ["prlimit", "--nofile=96:96", "--"]
        settings["cache"]["max_lookups"] = 200
    else:
        settings["cache"]["max_lookups"] = 4
    try:
        with running_daemon(
            bed, tmp_path, nameservers=[hostile_dns.address], settings=settings, wrapper=wrapper
        ) as daemon:
            # A Postfix process holds its connection; then a local client floods the daemon
            # with lookups of names whose DNS hangs.
            postfix = Client(daemon)
            assert postfix.ask(".probe.invalid") == NOTFOUND
            flood = Flood(daemon, flood_zone, connections=10, per_connection=60)
            time.sleep(1.0)
            domain = publish_enforce(bed, "victim")
            try:
                during = _never_notfound(postfix, domain, 3.0)
            finally:
                flood.stop()
            # The flood is over: the domain's policy is found, and was never denied meanwhile.
            after = _never_notfound(postfix, domain, 20.0)
            postfix.close()
            assert after[-1] == secure(domain), (during, after, daemon.log())
            assert all(r.startswith(("TEMP", "OK")) for r in during + after), (during, after)
            # Local failures are logged as an outage, not once per lookup.
            assert len(log_lines(daemon, "lookups fail for want of local resources \\(")) <= 1
    finally:
        hostile_dns.clear(flood_zone)


def test_the_daemon_raises_its_descriptor_limit_to_what_its_settings_take(
    bed: Bed, tmp_path: Path
) -> None:
    # systemd starts services with a soft limit of 1024: below what 1000 connections and 100
    # lookups may take. The daemon raises it, up to the hard limit.
    wrapper = ["prlimit", "--nofile=256:8192", "--"]
    settings = {"server": {"max_connections": 1000}, "cache": {"max_lookups": 100}}
    with running_daemon(bed, tmp_path, settings=settings, wrapper=wrapper) as daemon:
        limits = Path(f"/proc/{daemon.process.pid}/limits").read_text()
        soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits).groups()  # type: ignore[union-attr]
        assert (int(soft), int(hard)) == (1000 + 2 * 100 + 64, 8192)
        assert not log_lines(daemon, "file descriptor limit"), daemon.log()


def test_the_shipped_unit_allows_the_descriptors_of_the_defaults() -> None:
    unit = (REPO / "contrib" / "postfix-mtasts.service").read_text()
    found = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert found, "the unit sets no LimitNOFILE"
    assert int(found.group(1)) >= descriptors_needed(Config())


# --------------------------------------------------------------------------------------------------
# 5. Memory grows with what clients send.


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _pipeline(daemon: Daemon, requests: list[str]) -> list[str]:
    """Send every request on one connection, pipelined, and read every reply."""
    with socket.create_connection((daemon.host, daemon.port), timeout=30) as sock:
        payload = b"".join(netstring(r.encode()) for r in requests)
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        data = b""
        replies: list[str] = []
        while len(replies) < len(requests):
            chunk = sock.recv(1 << 16)
            assert chunk, f"connection closed after {len(replies)} replies"
            data += chunk
            while True:
                length, colon, rest = data.partition(b":")
                if not colon or len(rest) <= int(length):
                    break
                replies.append(rest[: int(length)].decode())
                data = rest[int(length) + 1 :]
        sender.join()
    return replies


def test_made_up_map_names_do_not_grow_memory(bed: Bed, tmp_path: Path) -> None:
    enforce = bed.domain("enforce")
    with running_daemon(bed, tmp_path) as daemon:
        assert daemon.request(enforce).startswith("OK secure")
        _pipeline(daemon, [f"warmup{n} {enforce}" for n in range(2000)])
        before = _rss_kib(daemon.process.pid)
        for batch in range(10):
            replies = _pipeline(daemon, [f"m{batch}x{n} {enforce}" for n in range(10000)])
            assert all(r.startswith("OK secure") for r in replies)
        grown = _rss_kib(daemon.process.pid) - before
    # 100000 names: about 50 MB before the bound (one memo table per name); now a few.
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB"


def test_made_up_domains_are_bounded_in_memory(bed: Bed, tmp_path: Path) -> None:
    # Names that do not exist (NXDOMAIN at once): each costs a lookup, and before the bound
    # about 2 KiB of memory for unused_after (30 days).
    zone = bed.unique_domain("junk")
    settings = {"cache": {"memory_domains": 1000, "max_lookups": 50}}
    with running_daemon(bed, tmp_path, settings=settings) as daemon:
        assert set(_pipeline(daemon, [f"postfix w{n}.{zone}" for n in range(2000)])) == {NOTFOUND}
        before = _rss_kib(daemon.process.pid)
        for batch in range(3):
            requests = [f"postfix n{batch}x{n}.{zone}" for n in range(4000)]
            assert set(_pipeline(daemon, requests)) == {NOTFOUND}
        grown = _rss_kib(daemon.process.pid) - before
        # 12000 more names: about 24 MB without the bound.
        assert grown < 8 * 1024, f"RSS grew by {grown} KiB"
        assert log_lines(daemon, r"domains in memory \(cache.memory_domains\): dropped \d+")
        # A protected domain is still answered, and from memory the second time.
        enforce = bed.domain("enforce")
        assert daemon.request(enforce).startswith("OK secure")
        assert daemon.request(enforce).startswith("OK secure")


# --------------------------------------------------------------------------------------------------
# 7. A file that is not our cache is renamed.


def _foreign_files(directory: Path) -> dict[str, bytes]:
    text = directory / "notes.txt"
    text.write_text("my notes, not a cache\n" * 100)
    other = directory / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE accounts (name TEXT, balance INTEGER)")
    db.execute("INSERT INTO accounts VALUES ('alice', 10)")
    db.commit()
    db.close()
    return {"text": text.read_bytes(), "sqlite": other.read_bytes()}


@pytest.mark.parametrize("kind", ["text", "sqlite"])
def test_a_file_that_is_not_our_cache_is_refused_and_left_untouched(
    bed: Bed, tmp_path: Path, kind: str
) -> None:
    contents = _foreign_files(tmp_path)
    path = tmp_path / ("notes.txt" if kind == "text" else "other.sqlite")
    config = tmp_path / "config.toml"
    config.write_text(
        f'listen = ["inet:127.0.0.1:0"]\n[cache]\nbackend = "sqlite"\npath = "{path}"\n'
    )
    for command in ("check-config", "serve"):
        result = subprocess.run(
            [sys.executable, "-m", "postfix_mtasts", command, "-c", str(config)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert f"{config}: cache.path: {path}: not a postfix-mtasts cache" in result.stderr
        assert "Traceback" not in output
    assert path.read_bytes() == contents[kind]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.toml",
        "notes.txt",
        "other.sqlite",
    ]


def test_a_damaged_cache_of_ours_is_moved_aside(bed: Bed, tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    damaged_cache(path)
    settings = {"cache": {"backend": "sqlite", "path": str(path)}}
    with running_daemon(bed, tmp_path / "run", settings=settings) as daemon:
        assert daemon.request(bed.domain("enforce")).startswith("OK secure")
        assert log_lines(daemon, "cache was damaged .* moved it to")
    assert [p.name for p in tmp_path.glob("cache.sqlite.damaged-*")]
