"""``postfix-mtasts doctor``: is the local Postfix set up so that MTA-STS works?

Reads Postfix's configuration only through Postfix's own ``postconf`` (``-c DIR`` for another
configuration directory): the values as Postfix expands them (``postconf -x -h``), the ``-o``
options of the ``smtp`` service in master.cf, which win over them (``postconf -P``), and that
service's chroot field (``postconf -F``). Reads the daemon's configuration with
`config.load`. Then checks what breaks MTA-STS in practice and says, per check, one line: ``OK``,
``WARN`` (works, but not as well as it could) or ``FAIL`` (MTA-STS does not work, or every mail is
deferred), naming the parameter, file or key and what to change.

The checks (`diagnose`): the Postfix version; ``smtp_tls_security_level``; the CA roots the
``secure`` level needs; every ``socketmap:`` table of ``smtp_tls_policy_maps``, resolved as the
possibly chrooted smtp client resolves it, compared with the daemon's listeners and map names,
and asked a test key as Postfix asks it (``postmap -q``, or the socketmap protocol spoken to the
path inside the chroot, where ``postmap`` would look outside it); the TLSRPT setting of each map
against the Postfix version; with ``[dane] enabled``, ``smtp_dns_support_level`` and both
resolvers. The pure parts (`PostfixVersion`, `split_maps`, `socketmap_table`,
`policy_problem`) are tested with values alone.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import ssl
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from postfix_mtasts import client, config, listeners

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TROUBLE",
    "DoctorError",
    "Finding",
    "Postconf",
    "PostfixVersion",
    "Status",
    "diagnose",
    "exit_status",
    "policy_problem",
    "socketmap_table",
    "split_maps",
]

EXIT_OK = 0
EXIT_FAILED = 1
# postconf missing or failing, the daemon's configuration unreadable: nothing could be checked.
EXIT_TROUBLE = 2

# The key asked through each map by default: a parent-domain probe, which the daemon answers
# NOTFOUND without any lookup, so the check needs no network.
DEFAULT_KEY = ".postfix-mtasts-doctor.invalid"
# The socketmap name of the documented set-up (README, docs/postfix-setup.md).
DEFAULT_MAP = "postfix"
# Bounds on one postconf or postmap run and on a socketmap answer (Postfix itself waits 100 s).
COMMAND_TIMEOUT = 30.0
ANSWER_TIMEOUT = 10.0
# A resolver check asks one name; a dead resolver must not hold the report up for long.
DNS_TIMEOUT = 3.0
# What another program printed is shown at most this long.
SHOWN = 200
# Where Postfix's tools are on Debian when /usr/sbin is not on the PATH.
SBIN = "/usr/sbin:/sbin:/usr/local/sbin"

# Postfix releases that the answers need (TLS_README, TLSRPT_README, postconf(5)).
SERVERNAME_SINCE = (3, 4, 0)
TLSRPT_SINCE = (3, 10, 0)
STS_MX_PATTERNS_SINCE = (3, 10, 5)


class DoctorError(Exception):
    """Nothing can be checked: postconf is missing or fails, or the daemon's file is bad."""


class Status(enum.StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    """One line of the report: `subject` names the parameter, file or key checked."""

    status: Status
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.status}: {self.subject}: {self.message}"


def exit_status(findings: Sequence[Finding]) -> int:
    """0 when no check failed (warnings allowed), 1 otherwise."""
    return EXIT_FAILED if any(f.status is Status.FAIL for f in findings) else EXIT_OK


def shown(text: str) -> str:
    """Text another program produced, fit for one line (:func:`client.one_line`)."""
    return client.one_line(text, SHOWN)


# --------------------------------------------------------------------------------------------------
# The pure parts.


@dataclass(frozen=True, order=True)
class PostfixVersion:
    """A Postfix ``mail_version``: ``3.7.11``, ``3.10.5``, ``3.10-RC1``, ``3.11-20250101``.

    A release with a suffix (a release candidate, a development snapshot) sorts just before the
    release it leads to, after every earlier release: ``3.10-RC1`` has not every feature of
    ``3.10.0``, and ``3.11-20250101`` is taken to have every feature of the 3.10 releases."""

    release: tuple[int, int, int]
    # 0 for a release candidate or snapshot, 1 for the release itself (so that order=True works).
    final: int
    text: str

    @classmethod
    def parse(cls, text: str) -> PostfixVersion | None:
        match = re.fullmatch(r"(\d{1,4})\.(\d{1,4})(?:\.(\d{1,4}))?(-\S*)?", text.strip())
        if match is None:
            return None
        major, minor, patch, suffix = match.groups()
        return cls((int(major), int(minor), int(patch or 0)), 0 if suffix else 1, text.strip())

    def at_least(self, release: tuple[int, int, int]) -> bool:
        return (self.release, self.final) >= (release, 1)

    def __str__(self) -> str:
        return self.text


def split_maps(value: str) -> list[str]:
    """The tables of a Postfix lookup-table list: separated by commas and/or whitespace."""
    return [table for table in re.split(r"[\s,]+", value) if table]


def socketmap_table(table: str) -> tuple[str, str] | None:
    """``(endpoint, name)`` of ``socketmap:ENDPOINT:NAME``; None for any other table type.
    The name is what follows the last colon (socketmap_table(5)); it may be empty."""
    kind, colon, rest = table.partition(":")
    if kind != "socketmap" or not colon:
        return None
    endpoint, _, name = rest.rpartition(":")
    return endpoint, name


# TLS_README, "TLS policy table": the levels, and the attributes each Postfix release accepts.
_LEVELS = frozenset(
    ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure")
)
_ATTRIBUTES = frozenset(
    ("ciphers", "protocols", "exclude", "match", "tafile", "servername", "connection_reuse")
)
_TLSRPT_ATTRIBUTES = frozenset(
    (
        "policy_type",
        "policy_domain",
        "mx_host_pattern",
        "policy_string",
        "policy_failure",
        "policy_ttl",
    )
)
_TOKEN = re.compile(r"\{[^{}]*\}|[^\s{}]+|[{}]")


def policy_problem(policy: str, version: PostfixVersion | None) -> str | None:
    """Why Postfix ``version`` would refuse ``policy`` (the data of an ``OK`` answer) and defer
    the mail with "client TLS configuration problem"; None when it accepts it. An unknown
    version is taken to accept the TLSRPT attributes."""
    tokens = _TOKEN.findall(policy)
    if not tokens:
        return "empty policy"
    if tokens[0].lower() not in _LEVELS:
        return f"unknown security level {tokens[0]!r}"
    for token in tokens[1:]:
        if token.startswith("{"):
            name, equals, value = token[1:-1].partition("=")
        else:
            name, equals, value = token.partition("=")
        name, value = name.strip().lower(), value.strip()
        if token in ("{", "}") or not equals or not name:
            return f"malformed attribute {token!r}"
        if not value:
            return f"attribute {name!r} has an empty value"
        if name in _TLSRPT_ATTRIBUTES:
            if version is not None and not version.at_least(TLSRPT_SINCE):
                return f"attribute {name!r} needs Postfix 3.10 or newer (this is {version})"
        elif name not in _ATTRIBUTES:
            return f"unknown attribute {name!r}"
    return None


# --------------------------------------------------------------------------------------------------
# Postfix's tools.


def _tool(name: str) -> str:
    path = os.environ.get("PATH", "")
    found = shutil.which(name, path=f"{path}:{SBIN}" if path else SBIN)
    if found is None:
        raise DoctorError(f"{name} not found (on PATH or in {SBIN}): is Postfix installed?")
    return found


class Postconf:
    """Postfix's configuration as ``postconf [-c DIR]`` reports it, for the smtp client of the
    ``smtp/unix`` service: a ``-o NAME=VALUE`` of that service in master.cf wins over main.cf,
    as it does for the smtp client."""

    SERVICE = "smtp/unix"

    def __init__(self, config_dir: str | None = None) -> None:
        self.config_dir = config_dir
        self._command = _tool("postconf")
        self._cache: dict[str, str] = {}
        self._overrides: dict[str, str] | None = None

    def _run(self, *args: str) -> str:
        argv = [self._command, *(["-c", self.config_dir] if self.config_dir else []), *args]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DoctorError(f"{' '.join(argv)}: {exc}") from exc
        if done.returncode != 0:
            raise DoctorError(f"{' '.join(argv)}: {shown(done.stderr) or 'failed'}")
        return done.stdout

    def _service_overrides(self) -> dict[str, str]:
        if self._overrides is None:
            # One line per -o of the service: "smtp/unix/NAME = VALUE" ($names expanded).
            prefix = f"{self.SERVICE}/"
            overrides = {}
            for line in self._run("-P", "-x", self.SERVICE).splitlines():
                name, equals, value = line.partition(" = ")
                if equals and name.startswith(prefix):
                    overrides[name.removeprefix(prefix)] = value.strip()
            self._overrides = overrides
        return self._overrides

    def value(self, name: str) -> str:
        """The value of parameter `name` as the smtp client uses it ($names expanded): the
        service's ``-o`` in master.cf, else main.cf's or the default; "" for an empty value or a
        parameter this Postfix does not know."""
        overrides = self._service_overrides()
        if name in overrides:
            return overrides[name]
        if name not in self._cache:
            self._cache[name] = self._run("-x", "-h", name).strip()
        return self._cache[name]

    def subject(self, name: str) -> str:
        """How the report names parameter `name`: where its value comes from."""
        if name in self._service_overrides():
            return f"{name} (master.cf {self.SERVICE} -o)"
        return name

    def service_field(self, field: str) -> str | None:
        """A master.cf field of the service (``chroot``); None when there is no such service."""
        return self._run("-h", "-F", f"{self.SERVICE}/{field}").strip() or None


# --------------------------------------------------------------------------------------------------
# The checks.


@dataclass(frozen=True)
class _Smtp:
    """The smtp client as master.cf runs it."""

    chrooted: bool
    queue_directory: str

    def inside(self, path: str) -> str:
        """Where the smtp client finds `path` (absolute, as written in main.cf)."""
        if not self.chrooted:
            return path
        return os.path.join(self.queue_directory, path.lstrip("/"))


def diagnose(
    settings: config.Config,
    postconf: Postconf,
    *,
    config_name: str,
    key: str = DEFAULT_KEY,
) -> list[Finding]:
    """Every check, in order; `config_name` names the daemon's file in the report."""
    findings: list[Finding] = []
    version = _check_version(postconf, findings)
    smtp = _smtp_service(postconf, findings)
    _check_security_level(postconf, findings)
    _check_ca(postconf, smtp, findings)
    _check_maps(settings, postconf, smtp, version, findings, config_name=config_name, key=key)
    if settings.dane.enabled:
        _check_dane(settings, postconf, smtp, findings, config_name=config_name)
    return findings


def _check_version(postconf: Postconf, findings: list[Finding]) -> PostfixVersion | None:
    text = postconf.value("mail_version")
    version = PostfixVersion.parse(text)
    if version is None:
        findings.append(
            Finding(
                Status.WARN,
                "mail_version",
                f"cannot read the Postfix version {shown(text)!r}; the checks that depend on it"
                " assume a recent Postfix",
            )
        )
    elif not version.at_least(SERVERNAME_SINCE):
        findings.append(
            Finding(
                Status.FAIL,
                "mail_version",
                f"Postfix {version} does not know the servername= attribute of the daemon's"
                " answers (3.4 or newer): upgrade Postfix",
            )
        )
    else:
        findings.append(Finding(Status.OK, "mail_version", f"Postfix {version}"))
    return version


def _smtp_service(postconf: Postconf, findings: list[Finding]) -> _Smtp:
    queue = postconf.value("queue_directory")
    chroot = postconf.service_field("chroot")
    if chroot is None:
        findings.append(
            Finding(
                Status.WARN,
                "master.cf smtp/unix",
                "no smtp service of type unix in master.cf: the checks assume an smtp client"
                " that is not chrooted",
            )
        )
        return _Smtp(False, queue)
    # master(5): "-" is the default, no chroot since Postfix 3.0.
    chrooted = chroot == "y"
    where = f"chrooted in {queue}" if chrooted else "not chrooted"
    findings.append(
        Finding(Status.OK, "master.cf smtp/unix chroot", f"{chroot}: the smtp client runs {where}")
    )
    return _Smtp(chrooted, queue)


def _check_security_level(postconf: Postconf, findings: list[Finding]) -> None:
    level = postconf.value("smtp_tls_security_level")
    subject = postconf.subject("smtp_tls_security_level")
    hint = "set smtp_tls_security_level = may (opportunistic TLS for every other domain)"
    if not level:
        # postconf(5): an empty level falls back to the obsolete smtp_use_tls/smtp_enforce_tls.
        if postconf.value("smtp_enforce_tls") == "yes":
            level = "encrypt"
        elif postconf.value("smtp_use_tls") == "yes":
            level = "may"
        else:
            findings.append(
                Finding(
                    Status.FAIL,
                    subject,
                    "empty (the default), and smtp_use_tls and smtp_enforce_tls are off: this"
                    " means none, so mail to every domain without an MTA-STS policy (the daemon"
                    f" answers NOTFOUND) goes out without TLS; {hint}",
                )
            )
            return
        findings.append(Finding(Status.OK, subject, f"empty, {level} by the obsolete settings"))
        return
    if level == "none":
        findings.append(
            Finding(
                Status.FAIL,
                subject,
                "none: mail to every domain without an MTA-STS policy (the daemon answers"
                f" NOTFOUND) goes out without TLS; {hint}",
            )
        )
        return
    findings.append(Finding(Status.OK, subject, level))


def _check_ca(postconf: Postconf, smtp: _Smtp, findings: list[Finding]) -> None:
    ca_file = postconf.value("smtp_tls_CAfile")
    ca_path = postconf.value("smtp_tls_CApath")
    if not ca_file and not ca_path:
        findings.append(
            Finding(
                Status.FAIL,
                postconf.subject("smtp_tls_CAfile"),
                "not set, nor smtp_tls_CApath: the secure level of an MTA-STS answer checks the"
                " MX certificate against WebPKI roots, so every MTA-STS domain is deferred; set"
                " smtp_tls_CAfile = /etc/ssl/certs/ca-certificates.crt",
            )
        )
        return
    if ca_file:
        # The smtp client reads its CA file before it enters the chroot (tls_client_init in
        # its pre-jail initialisation), so the path outside the chroot is the one that counts.
        findings.append(_ca_file_finding(ca_file, postconf.subject("smtp_tls_CAfile")))
    if ca_path:
        findings.append(
            _ca_path_finding(
                ca_path, postconf.subject("smtp_tls_CApath"), smtp, also_file=bool(ca_file)
            )
        )


def _ca_file_finding(path: str, subject: str) -> Finding:
    try:
        context = ssl.create_default_context(cafile=path)
    except ssl.SSLError:
        # Read, but no certificate in it (SSLError is an OSError: caught first).
        context = None
    except OSError as exc:
        cause = exc.strerror or str(exc)
        return Finding(
            Status.FAIL,
            subject,
            f"{path}: cannot read ({cause}): the secure level of MTA-STS answers cannot verify"
            " any MX certificate; point it at a readable PEM file of CA certificates, such as"
            " /etc/ssl/certs/ca-certificates.crt",
        )
    count = 0 if context is None else context.cert_store_stats().get("x509_ca", 0)
    if count == 0:
        return Finding(
            Status.FAIL,
            subject,
            f"{path}: no CA certificate in it: the secure level of MTA-STS answers cannot verify"
            " any MX certificate; point it at a PEM file of CA certificates, such as"
            " /etc/ssl/certs/ca-certificates.crt",
        )
    return Finding(
        Status.OK,
        subject,
        f"{path}: {count} CA certificates (read before the smtp client enters any chroot)",
    )


def _ca_path_finding(path: str, subject: str, smtp: _Smtp, *, also_file: bool) -> Finding:
    # OpenSSL opens a CA directory's files when it verifies, inside the chroot by then.
    seen = smtp.inside(path)
    where = f"{seen} (inside the smtp chroot)" if smtp.chrooted else seen
    try:
        names = os.listdir(seen)
    except OSError as exc:
        status = Status.WARN if also_file else Status.FAIL
        fix = (
            "remove smtp_tls_CApath (smtp_tls_CAfile is enough)"
            if also_file
            else "set smtp_tls_CAfile = /etc/ssl/certs/ca-certificates.crt (read before the"
            " chroot) or copy the directory into the chroot"
        )
        return Finding(
            status, subject, f"{path}: {where} cannot be read ({exc.strerror or exc}); {fix}"
        )
    hashed = [n for n in names if re.fullmatch(r"[0-9a-f]{8}\.\d+", n)]
    if not hashed:
        status = Status.WARN if also_file else Status.FAIL
        return Finding(
            status,
            subject,
            f"{path}: {where} holds no hashed CA certificates (NNNNNNNN.0): run c_rehash or"
            " openssl rehash on it, or use smtp_tls_CAfile",
        )
    return Finding(Status.OK, subject, f"{path}: {where}: {len(hashed)} hashed certificates")


def _listener_description(settings: config.Config) -> str:
    return ", ".join(settings.listen)


def _same_place(listener: listeners.Listener, target: listeners.Listener) -> bool:
    if isinstance(listener, listeners.UnixListener) and isinstance(target, listeners.UnixListener):
        return os.path.normpath(listener.path) == os.path.normpath(target.path)
    if isinstance(listener, listeners.InetListener) and isinstance(target, listeners.InetListener):
        return (listener.host, listener.port) == (target.host, target.port)
    return False


def _ours(settings: config.Config, endpoint: str) -> bool | None:
    """Whether `endpoint` (as the smtp client reaches it) is one of the daemon's listeners; None
    when the daemon's listeners are systemd's and cannot be told from the file."""
    try:
        target = listeners.parse_endpoint(endpoint)
    except listeners.ListenerError:
        return False
    unknown = False
    for spec in settings.listen:
        listener = listeners.parse_listener(spec)
        if isinstance(listener, listeners.SystemdListener):
            unknown = True
        elif _same_place(listener, target):
            return True
    return None if unknown else False


def _check_maps(
    settings: config.Config,
    postconf: Postconf,
    smtp: _Smtp,
    version: PostfixVersion | None,
    findings: list[Finding],
    *,
    config_name: str,
    key: str,
) -> None:
    value = postconf.value("smtp_tls_policy_maps")
    subject = postconf.subject("smtp_tls_policy_maps")
    first = settings.listen[0]
    example = first if first.startswith("inet:") else "inet:127.0.0.1:8461"
    tables = [(t, socketmap_table(t)) for t in split_maps(value)]
    socketmaps = [(t, parsed) for t, parsed in tables if parsed is not None]
    if not socketmaps:
        findings.append(
            Finding(
                Status.FAIL,
                subject,
                f"{shown(value) or '(empty)'}: no socketmap: table, so Postfix never asks the"
                f" daemon; add socketmap:{example}:postfix",
            )
        )
        return
    for table, (endpoint, name) in socketmaps:
        where = f"{subject} {table}"
        reached = _reached_endpoint(endpoint, smtp, where, findings)
        if reached is None:
            continue
        _check_listener(settings, reached, where, findings, config_name=config_name)
        _check_name(settings, name, where, findings, config_name=config_name)
        _check_answer(postconf, table, name, reached, smtp, version, where, findings, key=key)
        _check_tlsrpt(settings, postconf, name, version, findings, config_name=config_name)


def _reached_endpoint(
    endpoint: str, smtp: _Smtp, where: str, findings: list[Finding]
) -> str | None:
    """The endpoint as the smtp client reaches it (a unix path inside its chroot); None (and a
    finding) when Postfix cannot use it."""
    try:
        parsed = listeners.parse_endpoint(endpoint)
    except listeners.ListenerError as exc:
        findings.append(Finding(Status.FAIL, where, f"{exc}; Postfix cannot reach it"))
        return None
    if not isinstance(parsed, listeners.UnixListener):
        return endpoint
    if not parsed.path.startswith("/"):
        findings.append(
            Finding(Status.FAIL, where, f"{parsed.path}: write the socket path absolute")
        )
        return None
    path = smtp.inside(parsed.path)
    if smtp.chrooted:
        findings.append(
            Finding(
                Status.OK,
                where,
                f"the smtp client is chrooted in {smtp.queue_directory} (master.cf smtp/unix"
                f" chroot = y): it opens the socket at {path}",
            )
        )
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        outside = ""
        if smtp.chrooted and os.path.exists(parsed.path):
            outside = (
                f"; {parsed.path} exists outside the chroot, where the chrooted smtp client"
                " cannot reach it"
            )
        findings.append(
            Finding(
                Status.FAIL,
                where,
                f"{path}: {exc.strerror or exc}{outside}; make the daemon listen on"
                f" unix:{path} (a path under {smtp.queue_directory}, named in main.cf without"
                " that prefix when smtp is chrooted), or use an inet: endpoint on loopback"
                if smtp.chrooted
                else f"{path}: {exc.strerror or exc}; make the daemon listen on unix:{path}",
            )
        )
        return None
    if not stat.S_ISSOCK(mode):
        findings.append(Finding(Status.FAIL, where, f"{path} is not a socket"))
        return None
    return f"unix:{path}"


def _check_listener(
    settings: config.Config, reached: str, where: str, findings: list[Finding], *, config_name: str
) -> None:
    ours = _ours(settings, reached)
    if ours is False:
        findings.append(
            Finding(
                Status.WARN,
                where,
                f"{reached} is not among the listeners of {config_name} (listen ="
                f" {_listener_description(settings)}): the answer comes from another daemon or"
                " configuration; make them agree",
            )
        )
    elif ours is None:
        findings.append(
            Finding(
                Status.OK,
                where,
                f"listen = systemd in {config_name}: the answer below shows whether a daemon"
                f" listens at {reached}",
            )
        )
    else:
        findings.append(Finding(Status.OK, where, f"{reached} is a listener of {config_name}"))


def _check_name(
    settings: config.Config, name: str, where: str, findings: list[Finding], *, config_name: str
) -> None:
    if not name or any(c.isspace() for c in name):
        findings.append(
            Finding(
                Status.FAIL,
                where,
                f"map name {name!r}: write the socketmap name after the last colon, for"
                " example :postfix",
            )
        )
        return
    if name in settings.maps:
        findings.append(Finding(Status.OK, where, f"map name {name!r}: profile [maps.{name}]"))
        return
    # "postfix" is the name every example uses for the [policy] profile: not a misspelling.
    if settings.maps and name != DEFAULT_MAP:
        known = ", ".join(f"[maps.{n}]" for n in sorted(settings.maps))
        findings.append(
            Finding(
                Status.WARN,
                where,
                f"map name {name!r} has no [maps.{name}] in {config_name}, so it gets the"
                f" [policy] profile; the file has {known}: correct the name after the last"
                " colon if one of those was meant",
            )
        )
        return
    findings.append(Finding(Status.OK, where, f"map name {name!r}: profile [policy]"))


def _check_answer(
    postconf: Postconf,
    table: str,
    name: str,
    reached: str,
    smtp: _Smtp,
    version: PostfixVersion | None,
    where: str,
    findings: list[Finding],
    *,
    key: str,
) -> None:
    if reached.startswith("unix:") and smtp.chrooted:
        # postmap does not chroot: it would open the path outside the jail. Ask the path the
        # smtp client opens, speaking the protocol as Postfix does.
        how = f"socketmap request {name!r} {key!r} to {reached}"
        try:
            asking = client.Client(reached, ANSWER_TIMEOUT)
            try:
                reply = asking.request(name, key)
            finally:
                asking.close()
        except client.ClientError as exc:
            findings.append(Finding(Status.FAIL, where, f"{how}: {shown(str(exc))}"))
            return
        status, _, data = reply.partition(" ")
        if status == "NOTFOUND":
            findings.append(Finding(Status.OK, where, f"{how}: not found (NOTFOUND)"))
            return
        if status != "OK":
            findings.append(
                Finding(
                    Status.FAIL,
                    where,
                    f"{how}: {shown(reply)}: Postfix defers the mail on such an answer",
                )
            )
            return
        _judge_policy(data, how, version, where, findings)
        return
    postmap = _tool("postmap")
    argv = [postmap, *(["-c", postconf.config_dir] if postconf.config_dir else [])]
    argv += ["-q", key, table]
    how = f"postmap -q {key} {table}"
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        findings.append(
            Finding(
                Status.FAIL,
                where,
                f"{how}: no answer within {COMMAND_TIMEOUT:g} s: Postfix would wait 100 s"
                " and defer the mail",
            )
        )
        return
    # postmap: exit 1 and no output for not found; "fatal: ... query error" (exit 1) for no
    # connection or an answer it refuses. Warnings about the configuration are not the map's.
    fatal = [line for line in done.stderr.splitlines() if "fatal:" in line]
    if done.returncode != 0 and fatal:
        findings.append(
            Finding(
                Status.FAIL,
                where,
                f"{how}: {shown(fatal[0])}; start the daemon or make this endpoint one of"
                " its listeners",
            )
        )
        return
    if done.returncode != 0:
        findings.append(Finding(Status.OK, where, f"{how}: not found (NOTFOUND)"))
        return
    _judge_policy(done.stdout, how, version, where, findings)


def _judge_policy(
    policy: str,
    how: str,
    version: PostfixVersion | None,
    where: str,
    findings: list[Finding],
) -> None:
    policy = policy.strip()
    problem = policy_problem(policy, version)
    if problem is None:
        findings.append(Finding(Status.OK, where, f"{how}: {shown(policy)}"))
    else:
        findings.append(
            Finding(
                Status.FAIL,
                where,
                f"{how}: {shown(policy)}: {problem}; Postfix defers such mail (client TLS"
                " configuration problem)",
            )
        )


def _check_tlsrpt(
    settings: config.Config,
    postconf: Postconf,
    name: str,
    version: PostfixVersion | None,
    findings: list[Finding],
    *,
    config_name: str,
) -> None:
    key = f"maps.{name}.tlsrpt" if name in settings.maps else "policy.tlsrpt"
    subject = f"{config_name} {key}"
    tlsrpt = settings.profile(name).tlsrpt
    if version is None:
        return
    if tlsrpt and not version.at_least(TLSRPT_SINCE):
        findings.append(
            Finding(
                Status.FAIL,
                subject,
                f"true, but Postfix {version} rejects the TLSRPT attributes (3.10 or newer) and"
                f" defers every mail to an MTA-STS domain; set {key} = false",
            )
        )
    elif tlsrpt and version.at_least(STS_MX_PATTERNS_SINCE):
        enforce = postconf.value("smtp_tls_enforce_sts_mx_patterns")
        if enforce == "no":
            findings.append(
                Finding(
                    Status.WARN,
                    subject,
                    f"true, but smtp_tls_enforce_sts_mx_patterns = no: Postfix {version} does"
                    " not match MX host names against the policy (RFC 8461 §4.1) itself; set it"
                    " to yes (the default)",
                )
            )
        else:
            findings.append(
                Finding(
                    Status.OK,
                    subject,
                    f"true; Postfix {version} matches MX host names against the policy itself"
                    " (smtp_tls_enforce_sts_mx_patterns)",
                )
            )
    elif tlsrpt:
        findings.append(Finding(Status.OK, subject, f"true; Postfix {version} accepts it"))
    elif version.at_least(STS_MX_PATTERNS_SINCE):
        findings.append(
            Finding(
                Status.WARN,
                subject,
                f"false; Postfix {version} can match MX host names against the policy with the"
                " exact one-label wildcard (smtp_tls_enforce_sts_mx_patterns) when the answer"
                f" carries the TLSRPT attributes: set {key} = true",
            )
        )
    elif version.at_least(TLSRPT_SINCE):
        findings.append(
            Finding(
                Status.OK,
                subject,
                f"false; Postfix {version} would accept tlsrpt = true (TLSRPT reports)",
            )
        )
    else:
        findings.append(
            Finding(Status.OK, subject, f"false, as Postfix {version} needs (3.10 for true)")
        )


def _check_dane(
    settings: config.Config,
    postconf: Postconf,
    smtp: _Smtp,
    findings: list[Finding],
    *,
    config_name: str,
) -> None:
    from postfix_mtasts import resolver as dns_resolver
    from postfix_mtasts import service

    level = postconf.value("smtp_dns_support_level")
    subject = postconf.subject("smtp_dns_support_level")
    if level != "dnssec":
        findings.append(
            Finding(
                Status.FAIL,
                subject,
                f"{level or 'empty (the default)'}, but dane.enabled = true in {config_name}:"
                " Postfix ignores the DNSSEC status of its lookups and cannot apply the"
                f" daemon's dane/dane-only answers; set smtp_dns_support_level = dnssec",
            )
        )
    else:
        findings.append(Finding(Status.OK, subject, "dnssec"))

    check = settings.dane.check_name or "."
    # Ours: the check the daemon makes at start.
    try:
        ours = service.make_resolver(settings)
        validates = ours.validates(check)
        servers = ", ".join(ours.nameservers)
        cause = f"no AD bit for {check}"
    except (ValueError, dns_resolver.LocalError) as exc:
        validates, servers, cause = False, "?", shown(str(exc))
    subject = f"{config_name} dns.nameservers"
    if validates:
        findings.append(
            Finding(Status.OK, subject, f"{servers} validates DNSSEC (AD bit for {check})")
        )
    else:
        findings.append(
            Finding(
                Status.FAIL,
                subject,
                f"{servers}: {cause}: the daemon finds no DANE policy; point dns.nameservers at"
                " a validating resolver",
            )
        )

    # Postfix's: the resolv.conf the smtp client reads, inside its chroot when chrooted.
    path = smtp.inside("/etc/resolv.conf")
    try:
        nameservers = dns_resolver.nameservers_in(path)
        postfix_resolver = dns_resolver.Resolver(
            nameservers, timeout=DNS_TIMEOUT, lifetime=2 * DNS_TIMEOUT
        )
        validates = postfix_resolver.validates(check)
        cause = f"no AD bit for {check}"
    except ValueError as exc:
        validates, nameservers, cause = False, [], f"no usable nameserver ({shown(str(exc))})"
    except dns_resolver.LocalError as exc:
        validates, cause = False, shown(str(exc))
    if validates:
        findings.append(
            Finding(
                Status.OK,
                path,
                f"nameserver {', '.join(nameservers)} validates DNSSEC (AD bit for {check})",
            )
        )
    else:
        findings.append(
            Finding(
                Status.FAIL,
                path,
                (f"nameserver {', '.join(nameservers)}: " if nameservers else "")
                + f"{cause}: Postfix treats every"
                " TLSA record as insecure and defers mail the daemon answers dane-only for;"
                " make the nameserver there a validating resolver (such as unbound on"
                " 127.0.0.1)",
            )
        )


def render(findings: Sequence[Finding]) -> str:
    """The report: one line per finding, then a summary."""
    lines = [str(f) for f in findings]
    failed = sum(f.status is Status.FAIL for f in findings)
    warned = sum(f.status is Status.WARN for f in findings)
    lines.append(f"{len(findings)} checks: {failed} failed, {warned} warnings")
    return "\n".join(lines) + "\n"
