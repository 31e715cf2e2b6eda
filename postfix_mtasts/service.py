"""``postfix-mtasts serve``: the daemon assembled and run: logging, signals, detaching, privileges.

The parts are built from the configuration: the listeners are bound (as root, for privileged
ports and socket paths), python-daemon's `DaemonContext` detaches, writes the pid file and
becomes the configured user, then the cache (`policydb`, its store) is opened and the `server`
serves the `responder`. Request handling itself lives in those modules, not here; this one
answers SIGTERM/SIGINT (stop), SIGHUP (reload) and tells systemd how it goes (sd_notify:
readiness, a one-line status, and watchdog pings from the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import importlib
import logging
import logging.handlers
import os
import pwd
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from postfix_mtasts import __version__, config
from postfix_mtasts.dane import DaneCache
from postfix_mtasts.fetch import Fetcher
from postfix_mtasts.listeners import Listener, ListenerError, parse_listener
from postfix_mtasts.policydb import PolicyDB
from postfix_mtasts.resolver import Resolver
from postfix_mtasts.responder import Responder, Unready
from postfix_mtasts.server import Server
from postfix_mtasts.store import (
    CorruptStoreError,
    ForeignFileError,
    NewerSchemaError,
    Store,
    StoreError,
    open_store,
    where_of,
)
from postfix_mtasts.store.late import LateStore
from postfix_mtasts.store.memory import MemoryStore
from postfix_mtasts.store.sqlite import SqliteStore, move_aside

if TYPE_CHECKING:
    from postfix_mtasts.metrics import Exporter

__all__ = ["run"]

log = logging.getLogger("postfix_mtasts")

# How often expired DANE verdicts are forgotten.
DANE_PRUNE_INTERVAL = 300.0
# How often the one-line summary systemd shows (STATUS=, `systemctl status`) is refreshed.
STATUS_INTERVAL = 10.0


# --------------------------------------------------------------------------------------------------
# Building the parts from the configuration.


def make_resolver(settings: config.Config) -> Resolver:
    dns = settings.dns
    return Resolver(dns.nameservers or None, timeout=dns.timeout, lifetime=dns.lifetime)


def make_fetcher(settings: config.Config, resolver: Resolver) -> Fetcher:
    https = settings.https
    return Fetcher(
        resolver,
        ca_file=https.ca_file or None,
        timeout=https.timeout,
        connect_timeout=https.connect_timeout,
        allow_private_addresses=https.allow_private_addresses,
        proxies={"https": https.proxy} if https.proxy else None,
    )


def make_store(settings: config.Config) -> Store:
    """The configured store; a memory store when it cannot be opened (lookups go on).

    A file that is not a postfix-mtasts cache is a configuration error (``config.ConfigError``):
    it is neither used nor moved aside."""
    c = settings.cache
    backend, path = c.backend, c.path
    bound = c.memory_domains
    opener = functools.partial(
        open_store,
        backend,
        path,
        memory_entries=bound,
        url=c.url,
        name=c.table if backend == "postgresql" else c.prefix,
        timeout=c.timeout,
    )
    try:
        store = opener()
    except ForeignFileError as exc:
        if backend == "sqlite":
            raise config.ConfigError(f"cache.path: {exc}") from exc
        log.error("cannot use the cache (%s)", exc)
    except CorruptStoreError as exc:
        # A damaged file stays damaged: keep it for inspection and start an empty cache, so that
        # every later restart is not memory-only too.
        try:
            aside = move_aside(path)
            store = opener()
        except StoreError as again:
            log.error("cache is damaged (%s) and cannot be replaced (%s)", exc, again)
        else:
            log.error("cache was damaged (%s); moved it to %s and started anew", exc, aside)
            return store
    except NewerSchemaError as exc:
        log.error("cannot use the cache (%s)", exc)
    except StoreError as exc:
        if backend in ("redis", "postgresql"):
            # The fleet's server may come back: try again, and meanwhile look up and keep what is
            # learnt in memory, as during any outage of the store.
            log.error("cannot open the cache (%s); trying again every few seconds", exc)
            name = c.table if backend == "postgresql" else c.prefix
            return LateStore(opener, where_of(backend, path, c.url, name), str(exc))
        log.error("cannot open the cache (%s)", exc)
    else:
        if isinstance(store, SqliteStore) and store.read_only:
            log.error(
                "cache %s can only be read (%s): answering from it, keeping what is learnt in"
                " memory, and trying to write it again later",
                path,
                store.read_only,
            )
        return store
    log.error("caching in memory only until the next restart")
    return open_store("memory", "", memory_entries=bound)


# Descriptors the daemon needs besides connections and lookups: listeners, the cache (the SQLite
# file, its -wal and -shm), logs, the DANE lookup threads' sockets, Python's own.
BASE_DESCRIPTORS = 64
# Descriptors one network lookup may hold at once: its DNS socket and the policy fetch's TCP
# connection.
LOOKUP_DESCRIPTORS = 2


def descriptors_needed(settings: config.Config) -> int:
    """File descriptors the configuration may take at once: every connection, every lookup."""
    return (
        settings.server.max_connections
        + LOOKUP_DESCRIPTORS * settings.cache.max_lookups
        + BASE_DESCRIPTORS
    )


def raise_descriptor_limit(settings: config.Config) -> None:
    """Raise the soft RLIMIT_NOFILE to what the configuration needs (systemd starts services at
    1024), as far as the hard limit allows; warn, naming the keys, when it does not allow it.
    Running out would make lookups fail for a local reason (they are then answered TEMP)."""
    import resource

    needed = descriptors_needed(settings)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file descriptor limit to %d: %s", wanted, exc)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the file descriptor limit is %d, below the %d that server.max_connections (%d) and"
            " cache.max_lookups (%d) may take: raise LimitNOFILE= (systemd) or lower them",
            soft,
            needed,
            settings.server.max_connections,
            settings.cache.max_lookups,
        )


def listeners(settings: config.Config) -> list[Listener]:
    s = settings.server
    return [
        parse_listener(
            spec, mode=s.socket_mode, owner=s.socket_owner or None, group=s.socket_group or None
        )
        for spec in settings.listen
    ]


# --------------------------------------------------------------------------------------------------
# Logging.


def setup_logging(settings: config.Config) -> None:
    """(Re)configure logging: stderr, a file, or syslog. Called again on SIGHUP, which reopens a
    log file that was rotated away. When the new destination cannot be opened, the old one stays
    and the error is logged there."""
    new: logging.Handler
    try:
        if settings.log.syslog:
            facility = logging.handlers.SysLogHandler.facility_names[settings.log.syslog_facility]
            address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
            new = logging.handlers.SysLogHandler(address=address, facility=facility)
            new.setFormatter(logging.Formatter("postfix-mtasts[%(process)d]: %(message)s"))
        else:
            if settings.log.file:
                new = logging.FileHandler(settings.log.file)
            else:
                new = logging.StreamHandler(sys.stderr)
            new.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    except OSError as exc:
        log.error("cannot open the log (%s); logging on where it went before", exc)
        return
    close_logging()
    root = logging.getLogger()
    root.addHandler(new)
    root.setLevel(settings.log.level.upper())
    # The store clients log each failed connection on their own: the cache logs an outage once
    # (policydb), and their debug lines describe connections in detail nobody needs.
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


_QUIET_LOGGERS = {
    "psycopg": logging.WARNING,
    "psycopg.pool": logging.ERROR,
    "redis": logging.WARNING,
}


def close_logging() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()


# --------------------------------------------------------------------------------------------------
# systemd readiness (sd_notify(3)), without a dependency.


def notify(state: str) -> None:
    """Send ``state`` (``READY=1``, ``STATUS=...``, newline-separated assignments) to systemd's
    notification socket; nothing when systemd did not give one (``NOTIFY_SOCKET``)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state, exc)


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float:
    """Seconds between two ``WATCHDOG=1`` pings, or 0 when systemd watches no watchdog for this
    process (sd_watchdog_enabled(3)): ``WATCHDOG_USEC`` set, and ``WATCHDOG_PID`` unset or this
    process's pid (a daemon detached with ``--daemon`` is not the process systemd started).
    Half the watchdog timeout, as sd_watchdog_enabled(3) advises, so one late ping is no restart."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec:
        return 0.0
    if owner and owner != str(os.getpid() if pid is None else pid):
        return 0.0
    try:
        timeout = int(usec)
    except ValueError:
        log.warning("systemd: WATCHDOG_USEC=%r is not a number; not sending watchdog pings", usec)
        return 0.0
    if timeout <= 0:
        return 0.0
    return timeout / 2e6


class _Notifier:
    """What the daemon tells systemd while it runs: ``WATCHDOG=1`` every half watchdog timeout and
    ``STATUS=`` every STATUS_INTERVAL seconds.

    Both are timers of the event loop (``call_later``), not threads: a loop that is stuck (a
    blocking call, a busy callback) sends no ping, and systemd restarts the daemon
    (``WatchdogSec=``). The status line is built from counters the daemon keeps anyway, so it
    costs the hot path nothing."""

    def __init__(self, status: Callable[[], str], watchdog: float) -> None:
        self._status = status
        self._watchdog = watchdog
        self._ping_timer: asyncio.TimerHandle | None = None
        self._status_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        loop = asyncio.get_running_loop()
        if self._watchdog:
            self._ping_timer = loop.call_later(self._watchdog, self._ping, loop)
        self._status_timer = loop.call_later(STATUS_INTERVAL, self._refresh, loop)

    def _ping(self, loop: asyncio.AbstractEventLoop) -> None:
        notify("WATCHDOG=1")
        self._ping_timer = loop.call_later(self._watchdog, self._ping, loop)

    def _refresh(self, loop: asyncio.AbstractEventLoop) -> None:
        notify(f"STATUS={self._status()}")
        self._status_timer = loop.call_later(STATUS_INTERVAL, self._refresh, loop)

    def stop(self) -> None:
        for timer in (self._ping_timer, self._status_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._status_timer = None


# --------------------------------------------------------------------------------------------------
# Privileges and detaching.


@dataclass(frozen=True)
class _Identity:
    uid: int
    gid: int
    name: str


def _identity(settings: config.Config) -> _Identity | None:
    user, group = settings.server.user, settings.server.group
    if not user and not group:
        return None
    try:
        pw = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError as exc:
        raise config.ConfigError(f"server.user/server.group: no such user or group: {exc}") from exc
    return _Identity(pw.pw_uid, gid, pw.pw_name)


def _hand_over_cache(identity: _Identity, settings: config.Config) -> None:
    """Give the SQLite cache (directory, file, -wal, -shm) to the user the daemon becomes, which
    must write it; a cache left by a run as root is taken over."""
    if settings.cache.backend != "sqlite":
        return
    directory = os.path.dirname(settings.cache.path)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    os.chown(directory, identity.uid, identity.gid)
    for suffix in ("", "-wal", "-shm"):
        path = settings.cache.path + suffix
        if os.path.exists(path):
            os.chown(path, identity.uid, identity.gid)


def _prepare_pid_directory(path: str, identity: _Identity) -> None:
    """Create the pid file's directory for the user the daemon becomes, so that it can remove its
    pid file when it stops. An existing directory is left as it is."""
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o755)
        os.chown(directory, identity.uid, identity.gid)


# Modules a running daemon may import late (dnspython loads record types on first use); they are
# imported before dropping privileges, in case the new user cannot read the installation.
_PRELOAD = (
    "concurrent.futures.thread",
    "encodings.ascii",
    "encodings.idna",
    "encodings.latin_1",
    # The daemon's DNS on its event loop: dnspython's asyncio resolver, asking through our backend.
    "dns.asyncquery",
    "dns.asyncresolver",
    "postfix_mtasts.dns_backend",
    "dns.rdtypes.IN.A",
    "dns.rdtypes.IN.AAAA",
    "dns.rdtypes.ANY.CNAME",
    "dns.rdtypes.ANY.DNSKEY",
    "dns.rdtypes.ANY.DS",
    "dns.rdtypes.ANY.MX",
    "dns.rdtypes.ANY.NSEC",
    "dns.rdtypes.ANY.NSEC3",
    "dns.rdtypes.ANY.OPT",
    "dns.rdtypes.ANY.RRSIG",
    "dns.rdtypes.ANY.SOA",
    "dns.rdtypes.ANY.TLSA",
    "dns.rdtypes.ANY.TXT",
    "postfix_mtasts.dane",
    "postfix_mtasts.store.memory",
    "postfix_mtasts.store.sqlite",
)


# The shared backends' modules, for the backend configured.
_PRELOAD_BACKEND = {
    "redis": ("postfix_mtasts.store.redis",),
    "postgresql": ("postfix_mtasts.store.postgresql",),
}


def _preload(backend: str = "") -> None:
    for name in _PRELOAD + _PRELOAD_BACKEND.get(backend, ()):
        try:
            importlib.import_module(name)
        except ImportError:
            if name in _PRELOAD:
                raise
            # The extra is not installed: opening the store says so, and caches in memory.


class _PidFile:
    """The pid file, in python-daemon's ``pidfile`` protocol: the daemon context enters it once
    detached, and exits it when the daemon stops.

    The file is opened when this object is made, while the process may still be root, and kept
    open across the detaching (``files_preserve``): the user the daemon becomes need not be able
    to create a file in the pid file's directory (``/run`` is root's)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def fileno(self) -> int:
        return self._fd

    def __enter__(self) -> _PidFile:
        try:
            os.write(self._fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(self._fd)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("cannot remove the pid file %s: %s", self.path, error.strerror)


def _log_descriptors() -> list[int]:
    """The descriptors logging writes to (a log file, the syslog socket): the daemon context must
    keep them, since the user the daemon becomes may not be able to open them again."""
    descriptors = []
    for handler in logging.getLogger().handlers:
        target: Any = getattr(handler, "stream", None) or getattr(handler, "socket", None)
        with contextlib.suppress(AttributeError, OSError, ValueError):
            descriptors.append(target.fileno())
    return descriptors


def _daemon_context(
    settings: config.Config, server: Server, becomes: _Identity | None, pid_file: str | None
) -> Any:
    """python-daemon's context for ``serve --daemon``: detach, umask, keep the listening sockets,
    the logs and the pid file, become `becomes` (uid, gid), write the pid file."""
    import daemon

    owner: dict[str, int] = {}
    if becomes is not None:
        _hand_over_cache(becomes, settings)
        _preload(settings.cache.backend)
        # Not DaemonContext(initgroups=True): python-daemon then calls os.initgroups() instead
        # of os.setgid(), leaving the process in root's group. The supplementary groups are set
        # here, while root; the context sets the gid, then the uid.
        os.initgroups(becomes.name, becomes.gid)
        owner = {"uid": becomes.uid, "gid": becomes.gid}
    pid_path = pid_file or settings.server.pid_file
    pidfile = None
    if pid_path:
        if becomes is not None:
            _prepare_pid_directory(pid_path, becomes)
        try:
            pidfile = _PidFile(pid_path)
        except OSError as exc:
            raise OSError(f"cannot write the pid file {pid_path}: {exc.strerror}") from exc
    keep: list[Any] = [*server.sockets, *_log_descriptors()]
    if pidfile is not None:
        keep.append(pidfile)
    return daemon.DaemonContext(
        files_preserve=keep,
        pidfile=pidfile,
        detach_process=True,
        umask=0o022,
        initgroups=False,
        **owner,
    )


# --------------------------------------------------------------------------------------------------
# The daemon.


class _Daemon:
    def __init__(self, settings: config.Config, config_path: str | None, server: Server) -> None:
        self.settings = settings
        self.config_path = config_path
        self.server = server
        self.stopping = asyncio.Event()
        self.db: PolicyDB | None = None
        self.responder: Responder | None = None

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        notifier = _Notifier(self.status, watchdog_interval())
        # Pinging from the start: opening the cache and starting the server run on the loop too.
        notifier.start()
        resolver = make_resolver(self.settings)
        store = make_store(self.settings)
        self.db = PolicyDB(
            store,
            resolver,
            make_fetcher(self.settings, resolver),
            self.settings.cache,
            tolerant=self.settings.tolerant,
        )
        dane_cache = self.start_dane(resolver)
        self.responder = Responder(self.settings, self.db, dane_cache)
        self.server.responder = self.responder
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.db.start()
        pruning = loop.create_task(self._prune_dane())
        exporter = self.start_metrics()
        await self.server.start()
        log.info("postfix-mtasts %s ready", __version__)
        notify(f"READY=1\nSTATUS={self.status()}")
        await self.stopping.wait()
        log.info("stopping: finishing requests in flight")
        notify("STOPPING=1\nSTATUS=stopping: finishing requests in flight")
        await self.server.stop()
        if exporter is not None:
            exporter.stop()
        pruning.cancel()
        await self.db.close()
        if self.responder.dane is not None:
            self.responder.dane.close()
        store.close()
        notifier.stop()
        log.info(
            "stopped after %d requests (%d answered from the cache, %d network lookups)",
            self.server.requests,
            self.db.hits,
            self.db.network_lookups,
        )

    def start_metrics(self) -> Exporter | None:
        """The metrics exporter serving on ``[metrics] listen``, or None when that is off.

        Started here, in the process that serves (a thread does not survive detaching), and
        imported only then: prometheus-client is an optional extra (config.py refuses the key
        without it). An address that cannot be bound stops the start (``OSError``)."""
        spec = self.settings.metrics.listen
        if not spec:
            return None
        from postfix_mtasts import metrics

        exporter = metrics.Exporter(spec, self)
        exporter.start()
        log.info("serving metrics on %s", spec)
        return exporter

    def status(self) -> str:
        """The one line ``systemctl status`` shows: what the daemon holds and does, and whether
        its cache works (``ok``; ``read-only``: a SQLite file answered from but not written;
        ``failing``: the store failed lately and is being avoided, see policydb)."""
        db = self.db
        if db is None:
            return "starting"
        store = db.store
        backend = "memory" if isinstance(store, MemoryStore) else self.settings.cache.backend
        # The store failed at its last call (policydb clears the cause when one succeeds again).
        if db.store_failing:
            state = "failing"
        elif isinstance(store, SqliteStore) and store.read_only:
            state = "read-only"
        else:
            state = "ok"
        return (
            f"answering; {_count(db.size, 'domain')} in memory, "
            f"{_count(db.pending, 'lookup')} running, "
            f"{_count(self.server.connections, 'connection')}, cache {backend} {state}"
        )

    async def _prune_dane(self) -> None:
        while True:
            await asyncio.sleep(DANE_PRUNE_INTERVAL)
            if self.responder is not None and self.responder.dane is not None:
                self.responder.dane.prune()

    def start_dane(self, resolver: Resolver) -> DaneCache | None:
        """The DANE cache when ``[dane] enabled``, after checking that the resolver validates."""
        settings = self.settings.dane
        if not settings.enabled:
            return None
        check = settings.check_name or "."

        def check_validation() -> None:
            if resolver.validates(check):
                log.info("DANE enabled; the resolver validates DNSSEC (AD bit set for %s)", check)
                return
            log.warning(
                "DANE is enabled but the resolver (%s) does not validate DNSSEC: no AD bit for "
                "%s. DANE policies will not be found until dns.nameservers points at a "
                "validating resolver",
                ", ".join(resolver.nameservers),
                check,
            )

        # In a thread: a resolver that does not answer must not hold up start or reload.
        asyncio.get_running_loop().run_in_executor(None, check_validation)
        cache = self.settings.cache
        return DaneCache(
            resolver, deadline=cache.first_lookup_deadline, max_verdicts=cache.memory_domains
        )

    def reload(self) -> None:
        """SIGHUP: reopen logs and apply a re-read configuration; keep the old one on error."""
        notify("RELOADING=1")
        try:
            new = config.load(self.config_path, daemon_files=False)
            new_listeners = listeners(new)
        except (config.ConfigError, ListenerError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            notify("READY=1")
            return
        setup_logging(new)
        old = self.settings
        if new.metrics != old.metrics:
            log.warning("metrics.listen takes effect at the next restart")
        where = ("backend", "path", "url", "prefix", "table", "timeout")
        if [getattr(new.cache, key) for key in where] != [getattr(old.cache, key) for key in where]:
            log.warning("cache.%s take effect at the next restart", ", cache.".join(where))
        if new.parsing != old.parsing:
            # Policies held in memory were read with the old setting; a restart reads every
            # cached policy again with the new one.
            log.warning("policy.parsing takes effect at the next restart")
        try:
            self.server.update_listeners(new_listeners)
        except ListenerError as exc:
            log.error("reload: %s; keeping the running listeners", exc)
        assert self.db is not None and self.responder is not None
        resolver = make_resolver(new)
        self.db.resolver = resolver
        self.db.fetcher = make_fetcher(new, resolver)
        self.db.settings = new.cache
        self.settings = new
        if new.dane.enabled != old.dane.enabled or new.dns != old.dns:
            if self.responder.dane is not None:
                self.responder.dane.close()
            self.responder.dane = self.start_dane(resolver)
        self.responder.settings = new
        log.info("configuration reloaded from %s", self.config_path or "the defaults")
        notify("READY=1")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def run(
    settings: config.Config, *, config_path: str | None, detach: bool, pid_file: str | None
) -> int:
    """Run the daemon until SIGTERM or SIGINT; return the exit status."""
    if detach and not settings.log.syslog and not settings.log.file:
        # A detached daemon has no stderr: log to syslog unless told otherwise.
        settings = replace(settings, log=replace(settings.log, syslog=True))
    setup_logging(settings)
    raise_descriptor_limit(settings)
    try:
        identity = _identity(settings)
        server = Server(
            Unready(),
            listeners(settings),
            max_connections=settings.server.max_connections,
            idle_timeout=settings.server.idle_timeout,
            request_timeout=settings.server.request_timeout,
        )
        # Bind while still privileged (ports below 1024, socket paths owned by root).
        server.bind()
    except (config.ConfigError, ListenerError) as exc:
        log.error("%s", exc)
        return 2

    context: Any = None
    try:
        if detach:
            # The user to become: only root can become another one.
            becomes = identity if identity is not None and os.geteuid() == 0 else None
            context = _daemon_context(settings, server, becomes, pid_file)
            context.open()
            if becomes is not None:
                log.info(
                    "running as user %s (uid %d, gid %d)", becomes.name, becomes.uid, becomes.gid
                )
        asyncio.run(_Daemon(settings, config_path, server).main())
    except config.ConfigError as exc:
        # Found only when the daemon opened it (the cache file's schema): as at start, no trace.
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("%s", exc)
        return 1
    except Exception:
        # A detached daemon has no stderr: say why it stopped where the postmaster looks.
        log.exception("stopped by an unexpected error")
        return 1
    finally:
        if context is not None:
            context.close()
    return 0
