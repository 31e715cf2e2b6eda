"""Where the daemon listens, and where a client connects: Postfix's endpoint notation and sockets.

Postfix names a socketmap server ``inet:HOST:PORT`` (an IPv6 address in brackets) or ``unix:PATH``
(socketmap_table(5)); the daemon also takes ``systemd``, every socket passed by systemd socket
activation (sd_listen_fds(3)). This module parses that notation for the listeners, for
``query --socketmap`` (`parse_endpoint`) and, with the same host/port splitter, the nameserver
list (`parse_nameserver`). It binds listeners (`bind`, before the daemon drops privileges),
keeps a unix socket file owned as configured, removes a stale one and refuses a live one, and
adopts systemd's sockets. Serving them is `server`'s job.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "DNS_PORT",
    "Bound",
    "InetListener",
    "Listener",
    "ListenerError",
    "SystemdListener",
    "UnixListener",
    "addresses",
    "bind",
    "parse_endpoint",
    "parse_listener",
    "parse_nameserver",
    "systemd_fds",
]

# sd_listen_fds(3): passed sockets start at this descriptor.
SD_LISTEN_FDS_START = 3
# sockaddr_un.sun_path on Linux holds 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107
# A nameserver without a port is asked on the DNS port (RFC 1035 §4.2).
DNS_PORT = 53

_LISTENER_KINDS = "inet:HOST:PORT, unix:PATH or systemd"
_ENDPOINT_KINDS = "inet:HOST:PORT, inet:[ADDRESS]:PORT or unix:PATH"


class ListenerError(Exception):
    """A listener spec that cannot be parsed or a socket that cannot be bound; names the spec."""


# --- the notation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """Where to listen, as written in the configuration (`spec`)."""

    spec: str


@dataclass(frozen=True)
class InetListener(Listener):
    """``inet:HOST:PORT``: every address HOST resolves to (an IPv6 literal in brackets)."""

    host: str
    port: int


@dataclass(frozen=True)
class UnixListener(Listener):
    """``unix:/path``; `mode`, `owner` and `group` are applied to the socket file."""

    path: str
    mode: int | None = None
    owner: str | int | None = None
    group: str | int | None = None


@dataclass(frozen=True)
class SystemdListener(Listener):
    """``systemd``: every listening socket passed by systemd socket activation."""


class _SplitError(ValueError):
    """Text that is not ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; says what is wrong."""


def split_host_port(text: str) -> tuple[str, str | None, bool]:
    """Split ``host:port``, ``[v6]:port``, ``[v6]``, ``host`` or a bare IPv6 address into
    ``(host, port text or None, bracketed)``; the one splitter behind every endpoint notation.

    Text with more than one colon and no brackets can only be a bare IPv6 address: it is returned
    whole as the host. Neither part is checked here; the caller knows what it may be. Raises
    `ValueError` (missing ``]``, text after ``]`` that is not ``:PORT``).
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise _SplitError("missing ']'")
        if not rest:
            return host, None, True
        if not rest.startswith(":"):
            raise _SplitError("expected ':PORT' after ']'")
        return host, rest[1:], True
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port, False
    return text, None, False


def _port(port_text: str) -> int | None:
    # ASCII digits only (str.isdigit() is true for "²" too), five at most before int(): that
    # refuses strings of thousands of digits, which int() would refuse slowly (ValueError).
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        return None
    port = int(port_text)
    return port if port <= 65535 else None


def parse_listener(
    spec: str,
    *,
    mode: int | None = None,
    owner: str | int | None = None,
    group: str | int | None = None,
) -> Listener:
    """Parse a Postfix-style listener: ``inet:127.0.0.1:8461``, ``inet:[::1]:8461``,
    ``inet:localhost:8461``, ``unix:/path/socket`` or ``systemd``.

    `mode`, `owner` and `group` (a name or a number; ``""`` means unset) are properties of a
    socket file and apply to ``unix:`` listeners only. Raises `ListenerError` naming the spec.
    """
    if spec == "systemd":
        return SystemdListener(spec)
    what = f"listener {spec!r}"
    kind, colon, address = spec.partition(":")
    if not colon:
        raise ListenerError(f"{what}: expected {_LISTENER_KINDS}")
    if kind == "inet":
        host, port = _parse_inet(what, address)
        return InetListener(spec, host, port)
    if kind == "unix":
        if not address.startswith("/"):
            raise ListenerError(f"{what}: the socket path must be absolute")
        _check_unix_path(what, address)
        if mode is not None and not 0 <= mode <= 0o7777:
            raise ListenerError(f"{what}: socket mode {mode:#o} is not a file mode")
        return UnixListener(spec, address, mode, owner or None, group or None)
    raise ListenerError(f"{what}: unknown type {kind!r}, expected {_LISTENER_KINDS}")


def parse_endpoint(spec: str) -> InetListener | UnixListener:
    """Parse where a client connects (``query --socketmap``): ``inet:HOST:PORT``,
    ``inet:[V6]:PORT`` or ``unix:PATH``, the notation of Postfix's ``socketmap:`` tables.

    A unix path may be relative here (to the working directory). Raises `ListenerError` naming
    the spec."""
    what = f"socketmap endpoint {spec!r}"
    kind, colon, address = spec.partition(":")
    if kind == "inet" and colon:
        host, port = _parse_inet(what, address)
        return InetListener(spec, host, port)
    if kind == "unix" and address:
        _check_unix_path(what, address)
        return UnixListener(spec, address)
    raise ListenerError(f"{what}: expected {_ENDPOINT_KINDS}")


def _parse_inet(what: str, address: str) -> tuple[str, int]:
    try:
        host, port_text, bracketed = split_host_port(address)
    except ValueError:
        raise ListenerError(f"{what}: expected inet:[IPV6-ADDRESS]:PORT") from None
    if bracketed:
        if port_text is None:
            raise ListenerError(f"{what}: expected inet:[IPV6-ADDRESS]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ListenerError(f"{what}: {host!r} is not an IPv6 address") from None
    else:
        if ":" in host:
            # Postfix's own rule: an IPv6 address in an endpoint goes in brackets.
            bare = host.rpartition(":")[0]
            raise ListenerError(f"{what}: write an IPv6 address in brackets, inet:[{bare}]:PORT")
        if port_text is None:
            raise ListenerError(f"{what}: expected inet:HOST:PORT")
        if not host:
            raise ListenerError(f"{what}: the host is missing")
        if not all(c.isascii() and (c.isalnum() or c in "-.") for c in host):
            raise ListenerError(f"{what}: {host!r} is not a host name or address")
    # Port 0 (any free port) is allowed: tests use it, and `Server.sockets` tells the port.
    port = _port(port_text)
    if port is None:
        raise ListenerError(f"{what}: port {port_text!r} is not a number up to 65535")
    return host, port


def _check_unix_path(what: str, path: str) -> None:
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ListenerError(f"{what}: the socket path is longer than {_MAX_UNIX_PATH} bytes")
    if "\0" in path:
        raise ListenerError(f"{what}: the socket path contains NUL")


def parse_nameserver(text: str) -> tuple[str, int]:
    """Split a nameserver given as ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6
    address into ``(address, port)``; the port defaults to 53.

    The host must be an IP address: looking a nameserver's name up would need a resolver first.
    Raises ``ValueError`` naming the text and what is wrong with it.
    """
    what = f"nameserver {text!r}"
    try:
        host, port_text, bracketed = split_host_port(text.strip())
    except _SplitError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if port_text == "":
        raise ValueError(f"{what}: empty port")
    if bracketed:
        try:
            version = ipaddress.ip_address(host).version
        except ValueError as exc:
            raise ValueError(f"{what}: {host!r} is not an IPv6 address") from exc
        if version != 6:
            raise ValueError(f"{what}: only IPv6 addresses go in brackets")
    if not host:
        raise ValueError(f"{what}: empty address")
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError as exc:
        raise ValueError(f"{what}: {host!r} is not an IP address") from exc
    if port_text is None:
        return address, DNS_PORT
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{what}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{what}: port {port} is out of range 1-65535")
    return address, port


# --- binding ---------------------------------------------------------------------------------


def systemd_fds(environ: Mapping[str, str] | None = None, pid: int | None = None) -> list[int]:
    """The descriptors passed by systemd socket activation for this process (sd_listen_fds(3)).

    Empty unless ``LISTEN_PID`` names this process (a child that inherited the environment
    must not take its parent's sockets) and ``LISTEN_FDS`` is set.
    """
    env = os.environ if environ is None else environ
    listen_pid = env.get("LISTEN_PID", "")
    listen_fds = env.get("LISTEN_FDS", "")
    if not listen_pid or not listen_fds:
        return []
    if not listen_pid.isdigit() or int(listen_pid) != (os.getpid() if pid is None else pid):
        return []
    if not listen_fds.isdigit():
        raise ListenerError(f"systemd: LISTEN_FDS={listen_fds!r} is not a number")
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(listen_fds)))


class Bound:
    """The sockets one listener holds, and how to clean up after them."""

    __slots__ = ("listener", "sockets", "unix_identity")

    def __init__(
        self,
        listener: Listener,
        sockets: list[socket.socket],
        unix_identity: tuple[int, int] | None = None,
    ) -> None:
        self.listener = listener
        self.sockets = sockets
        # (st_dev, st_ino) of the socket file we created: unlink it only if it is still ours.
        self.unix_identity = unix_identity

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if isinstance(self.listener, UnixListener) and self.unix_identity is not None:
            path = self.listener.path
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == self.unix_identity:
                    os.unlink(path)
            except OSError:
                pass
        self.sockets = []


def bind(listener: Listener, backlog: int, passed_fds: Sequence[int]) -> Bound:
    try:
        if isinstance(listener, InetListener):
            return Bound(listener, _bind_inet(listener, backlog))
        if isinstance(listener, UnixListener):
            return _bind_unix(listener, backlog)
        if isinstance(listener, SystemdListener):
            return Bound(listener, _adopt_systemd(passed_fds))
    except ListenerError:
        raise
    except OSError as exc:
        raise ListenerError(
            f"listener {listener.spec!r}: cannot listen: {exc.strerror or exc}"
        ) from exc
    raise ListenerError(f"listener {listener.spec!r}: unknown listener type")


def _bind_inet(listener: InetListener, backlog: int) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(
            listener.host,
            listener.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV,
        )
    except socket.gaierror as exc:
        raise ListenerError(
            f"listener {listener.spec!r}: cannot resolve {listener.host!r}: {exc.strerror}"
        ) from exc
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # [::] and 0.0.0.0 are separate listeners, as in Postfix.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_unix(listener: UnixListener, backlog: int) -> Bound:
    path = listener.path
    uid = _user_id(listener, listener.owner)
    gid = _group_id(listener, listener.group)
    _remove_stale_socket(listener)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        st = os.lstat(path)
        identity = (st.st_dev, st.st_ino)
        try:
            # Before listen(): nobody can connect while the file has the umask's permissions.
            try:
                if uid != -1 or gid != -1:
                    os.chown(path, uid, gid)
                if listener.mode is not None:
                    os.chmod(path, listener.mode)
            except OSError as exc:
                raise ListenerError(
                    f"listener {listener.spec!r}: cannot set the owner, group or mode of "
                    f"{path}: {exc.strerror}"
                ) from exc
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        sock.close()
        raise
    return Bound(listener, [sock], identity)


def _user_id(listener: UnixListener, owner: str | int | None) -> int:
    return _numeric_id(listener, owner, "owner", lambda name: pwd.getpwnam(name).pw_uid)


def _group_id(listener: UnixListener, group: str | int | None) -> int:
    return _numeric_id(listener, group, "group", lambda name: grp.getgrnam(name).gr_gid)


def _numeric_id(
    listener: UnixListener, value: str | int | None, what: str, by_name: Callable[[str], int]
) -> int:
    """The uid or gid for a socket's ``owner`` or ``group`` (a name or a number); -1 for none,
    which leaves it as it is (os.chown)."""
    if value is None:
        return -1
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    try:
        return by_name(value)
    except KeyError:
        unknown = f"listener {listener.spec!r}: unknown socket {what} {value!r}"
        raise ListenerError(unknown) from None


def _remove_stale_socket(listener: UnixListener) -> None:
    """Remove a socket file left by a daemon that is gone; refuse to take a live one."""
    path = listener.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"listener {listener.spec!r}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        pass  # nobody listens: stale
    else:
        raise ListenerError(f"listener {listener.spec!r}: another process listens on {path}")
    finally:
        probe.close()
    os.unlink(path)


def _adopt_systemd(fds: Sequence[int]) -> list[socket.socket]:
    if not fds:
        raise ListenerError(
            "listener 'systemd': no sockets passed (LISTEN_FDS/LISTEN_PID not set for this process)"
        )
    sockets: list[socket.socket] = []
    try:
        for fd in fds:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise ListenerError(
                    f"listener 'systemd': descriptor {fd} is not a socket: {exc.strerror}"
                ) from exc
            if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                sock.detach()
                raise ListenerError(
                    f"listener 'systemd': descriptor {fd} is not a listening stream socket "
                    "(the .socket unit needs Accept=no and ListenStream=)"
                )
            sockets.append(sock)
            os.set_inheritable(fd, False)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _describe(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(name)


def addresses(bound: Bound) -> str:
    return ", ".join(_describe(sock) for sock in bound.sockets)
