"""``postfix-mtasts doctor`` against real Postfix configuration directories.

Each test copies Debian's /etc/postfix/main.cf and master.cf into a directory of its own, edits
it with Postfix's own ``postconf -c DIR -e`` / ``postconf -c DIR -F -e`` (its queue_directory, so
its "chroot", is a temporary directory too), and runs ``python -m postfix_mtasts doctor
--postfix-config DIR`` as a subprocess against the real daemons of tests/mtasts_daemon.py, whose
answers it asks through ``postmap -q``. Each breakage has the line it must print. The machine's
Postfix is 3.7: the version rules are tested as a table, the 3.7 path end to end.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme
from bed import DANE_ZONE, SCENARIOS, Bed, domain_of

from postfix_mtasts.doctor import PostfixVersion, policy_problem, socketmap_table, split_maps

if TYPE_CHECKING:
    from mtasts_daemon import Daemon

pytest_plugins = ["mtasts_daemon"]

REPO = Path(__file__).resolve().parent.parent
POSTCONF = "/usr/sbin/postconf"
ENFORCE = domain_of("enforce")


def enforce_answer() -> str:
    patterns = [f".{m[2:]}" if m.startswith("*.") else m for m in SCENARIOS["enforce"].mx]
    return f"secure match={':'.join(patterns)} servername=hostname"


# --------------------------------------------------------------------------------------------------
# The pure parts.


@pytest.mark.parametrize(
    ("text", "attributes", "mx_patterns"),
    [
        ("3.7.11", False, False),
        ("3.9.2", False, False),
        ("3.10.0", True, False),
        ("3.10", True, False),
        ("3.10.4", True, False),
        ("3.10.5", True, True),
        ("3.10.10", True, True),
        ("3.11", True, True),
        ("3.11.1", True, True),
        ("4.0.0", True, True),
        # A release candidate has not every feature of the release it leads to.
        ("3.10-RC1", False, False),
        ("3.10.5-RC1", True, False),
        # A development snapshot of 3.11 comes after every 3.10 release.
        ("3.11-20250101", True, True),
        ("3.10-20241201", False, False),
    ],
)
def test_version_decides_tlsrpt_and_mx_patterns(
    text: str, attributes: bool, mx_patterns: bool
) -> None:
    version = PostfixVersion.parse(text)
    assert version is not None
    assert version.at_least((3, 10, 0)) is attributes
    assert version.at_least((3, 10, 5)) is mx_patterns


@pytest.mark.parametrize("text", ["", "postfix", "3", "3.x", "v3.10.5", "3.10.5 extra", "3..5"])
def test_version_that_is_no_version_is_none(text: str) -> None:
    assert PostfixVersion.parse(text) is None


def test_versions_order_like_releases() -> None:
    texts = ["3.9.2", "3.10-RC1", "3.10.0", "3.10.4", "3.10.5-RC1", "3.10.5", "3.11-20250101"]
    versions = [PostfixVersion.parse(t) for t in texts]
    assert versions == sorted(versions)  # type: ignore[type-var]


def test_policy_maps_are_split_like_postfix() -> None:
    value = "hash:/etc/postfix/tls, socketmap:inet:127.0.0.1:8461:postfix\n\tsocketmap:unix:/s:x,,"
    tables = split_maps(value)
    assert tables == [
        "hash:/etc/postfix/tls",
        "socketmap:inet:127.0.0.1:8461:postfix",
        "socketmap:unix:/s:x",
    ]
    assert [socketmap_table(t) for t in tables] == [
        None,
        ("inet:127.0.0.1:8461", "postfix"),
        ("unix:/s", "x"),
    ]
    assert socketmap_table("socketmap:inet:[::1]:8461:strict") == ("inet:[::1]:8461", "strict")


V37 = PostfixVersion.parse("3.7.11")
V310 = PostfixVersion.parse("3.10.0")


@pytest.mark.parametrize(
    ("policy", "version", "problem"),
    [
        ("secure match=mx.example.com:.example.net servername=hostname", V37, None),
        ("dane-only", V37, None),
        ("may", V37, None),
        ("sometimes", V37, "unknown security level 'sometimes'"),
        ("secure match=", V37, "attribute 'match' has an empty value"),
        ("secure colour=blue", V37, "unknown attribute 'colour'"),
        ("secure match", V37, "malformed attribute 'match'"),
        (
            "secure match=a.example policy_type=sts policy_domain=example.com",
            V37,
            "attribute 'policy_type' needs Postfix 3.10 or newer (this is 3.7.11)",
        ),
        (
            "secure match=a.example policy_type=sts { policy_string = mode: enforce }",
            V310,
            None,
        ),
        ("", V37, "empty policy"),
    ],
)
def test_policy_problem_is_what_postfix_refuses(
    policy: str, version: PostfixVersion | None, problem: str | None
) -> None:
    assert policy_problem(policy, version) == problem


# --------------------------------------------------------------------------------------------------
# Real Postfix configuration directories.


@dataclass(frozen=True)
class Report:
    status: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def has(self, start: str) -> bool:
        return any(line.startswith(start) for line in self.lines)


def run_doctor(*args: str) -> Report:
    done = subprocess.run(
        [sys.executable, "-m", "postfix_mtasts", "doctor", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Report(done.returncode, done.stdout, done.stderr)


def postconf(directory: Path, *args: str) -> None:
    subprocess.run([POSTCONF, "-c", str(directory), *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "roots.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@dataclass(frozen=True)
class PostfixDir:
    """A Postfix configuration directory and the queue directory (the chroot) it names."""

    path: Path
    queue: Path

    def set(self, **params: str) -> None:
        postconf(self.path, "-e", *(f"{k}={v}" for k, v in params.items()))

    def chroot(self, value: str) -> None:
        postconf(self.path, "-F", "-e", f"smtp/unix/chroot={value}")


def make_postfix_dir(tmp_path: Path, ca_file: Path, policy_maps: str) -> PostfixDir:
    """Debian's main.cf and master.cf (smtp chrooted), set up as docs/postfix-setup.md says."""
    directory = tmp_path / "postfix"
    directory.mkdir()
    for name in ("main.cf", "master.cf"):
        shutil.copy(Path("/etc/postfix") / name, directory / name)
    queue = tmp_path / "queue"
    queue.mkdir(exist_ok=True)
    made = PostfixDir(directory, queue)
    made.set(
        compatibility_level="3.6",
        queue_directory=str(queue),
        smtp_tls_security_level="may",
        smtp_tls_CAfile=str(ca_file),
        smtp_tls_policy_maps=policy_maps,
    )
    made.chroot("y")
    return made


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_all_good_inet_setup_exits_0_with_the_answer_postmap_gets(
    tmp_path: Path, ca_file: Path, daemon: Daemon
) -> None:
    table = daemon.table("postfix")
    pf = make_postfix_dir(tmp_path, ca_file, table)
    report = run_doctor(
        "-c", str(daemon.config_path), "--postfix-config", str(pf.path), "--key", ENFORCE
    )
    assert report.status == 0, report
    assert "FAIL" not in report.stdout and "WARN" not in report.stdout, report
    asked = f"postmap -q {ENFORCE} {table}: {enforce_answer()}"
    assert f"OK: smtp_tls_policy_maps {table}: {asked}" in report.lines
    assert f"OK: smtp_tls_policy_maps {table}: {daemon.inet} is a listener of" in report.stdout
    assert "OK: mail_version: Postfix 3.7.11" in report.lines
    assert (
        f"OK: master.cf smtp/unix chroot: y: the smtp client runs chrooted in {pf.queue}"
        in report.lines
    )
    assert report.has(f"OK: smtp_tls_CAfile: {ca_file}: 1 CA certificates")
    assert "OK: smtp_tls_security_level: may" in report.lines
    assert report.lines[-1] == f"{len(report.lines) - 1} checks: 0 failed, 0 warnings"


def test_all_good_unix_socket_inside_the_chroot_is_asked_there(
    tmp_path: Path, ca_file: Path, daemon: Daemon
) -> None:
    # The daemon's socket is DIR/mtasts.sock: with queue_directory = DIR, the chrooted smtp
    # client names it /mtasts.sock.
    table = "socketmap:unix:/mtasts.sock:strict"
    pf = make_postfix_dir(tmp_path, ca_file, table)
    pf.set(queue_directory=str(daemon.directory))
    report = run_doctor(
        "-c", str(daemon.config_path), "--postfix-config", str(pf.path), "--key", ENFORCE
    )
    assert report.status == 0, report
    where = f"OK: smtp_tls_policy_maps {table}: "
    assert (
        f"{where}the smtp client is chrooted in {daemon.directory} (master.cf smtp/unix chroot"
        f" = y): it opens the socket at {daemon.socket_path}" in report.lines
    )
    assert f"{where}unix:{daemon.socket_path} is a listener of" in report.stdout
    assert f"{where}map name 'strict': profile [maps.strict]" in report.lines
    assert (
        f"{where}socketmap request 'strict' {ENFORCE!r} to unix:{daemon.socket_path}:"
        f" {enforce_answer()}" in report.lines
    )


def test_no_socketmap_in_policy_maps_fails(tmp_path: Path, ca_file: Path, daemon: Daemon) -> None:
    pf = make_postfix_dir(tmp_path, ca_file, "hash:/etc/postfix/tls_policy")
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path))
    assert report.status == 1, report
    assert (
        "FAIL: smtp_tls_policy_maps: hash:/etc/postfix/tls_policy: no socketmap: table, so"
        f" Postfix never asks the daemon; add socketmap:{daemon.inet}:postfix" in report.lines
    )


def test_map_nobody_answers_fails_with_postmaps_error(
    tmp_path: Path, ca_file: Path, daemon: Daemon
) -> None:
    endpoint = f"inet:127.0.0.1:{_free_port()}"
    table = f"socketmap:{endpoint}:postfix"
    pf = make_postfix_dir(tmp_path, ca_file, f"hash:/etc/postfix/tls_policy, {table}")
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path))
    assert report.status == 1, report
    where = f"smtp_tls_policy_maps {table}: "
    assert report.has(f"WARN: {where}{endpoint} is not among the listeners of")
    failed = [line for line in report.lines if line.startswith(f"FAIL: {where}postmap -q ")]
    assert len(failed) == 1, report
    assert "query error" in failed[0] and "Connection refused" in failed[0], report
    assert failed[0].endswith("start the daemon or make this endpoint one of its listeners")


def test_unix_socket_outside_the_chroot_fails_naming_the_path_smtp_opens(
    tmp_path: Path, ca_file: Path, daemon: Daemon
) -> None:
    table = f"socketmap:unix:{daemon.socket_path}:postfix"
    pf = make_postfix_dir(tmp_path, ca_file, table)
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path))
    assert report.status == 1, report
    inside = f"{pf.queue}{daemon.socket_path}"
    assert (
        f"FAIL: smtp_tls_policy_maps {table}: {inside}: No such file or directory;"
        f" {daemon.socket_path} exists outside the chroot, where the chrooted smtp client cannot"
        f" reach it; make the daemon listen on unix:{inside}" in report.stdout
    )

    # Without the chroot the same table works.
    pf.chroot("n")
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path))
    assert report.status == 0, report
    assert f"OK: smtp_tls_policy_maps {table}: postmap -q " in report.stdout


def test_wrong_map_name_warns_naming_the_profiles(
    tmp_path: Path, ca_file: Path, daemon: Daemon
) -> None:
    table = daemon.table("strcit")
    pf = make_postfix_dir(tmp_path, ca_file, table)
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path))
    assert report.status == 0, report
    assert (
        f"WARN: smtp_tls_policy_maps {table}: map name 'strcit' has no [maps.strcit] in"
        f" {daemon.config_path}, so it gets the [policy] profile; the file has"
        " [maps.opportunistic], [maps.strict]: correct the name after the last colon if one of"
        " those was meant" in report.lines
    )


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"smtp_tls_security_level": "none"},
            "FAIL: smtp_tls_security_level: none: mail to every domain without an MTA-STS policy",
        ),
        (
            {"smtp_tls_security_level": ""},
            "FAIL: smtp_tls_security_level: empty (the default), and smtp_use_tls and"
            " smtp_enforce_tls are off: this means none",
        ),
        (
            {"smtp_tls_CAfile": "/nonexistent/roots.pem"},
            "FAIL: smtp_tls_CAfile: /nonexistent/roots.pem: cannot read (No such file or"
            " directory)",
        ),
        (
            {"smtp_tls_CAfile": "/etc/hostname"},
            "FAIL: smtp_tls_CAfile: /etc/hostname: no CA certificate in it",
        ),
        (
            {"smtp_tls_CAfile": "", "smtp_tls_CApath": ""},
            "FAIL: smtp_tls_CAfile: not set, nor smtp_tls_CApath",
        ),
    ],
)
def test_each_breakage_of_main_cf_has_its_line(
    tmp_path: Path, ca_file: Path, daemon: Daemon, params: dict[str, str], expected: str
) -> None:
    pf = make_postfix_dir(tmp_path, ca_file, daemon.table())
    pf.set(**params)
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path))
    assert report.status == 1, report
    assert report.has(expected), report


def test_an_option_of_the_smtp_service_in_master_cf_wins_over_main_cf(
    tmp_path: Path, ca_file: Path, daemon: Daemon
) -> None:
    pf = make_postfix_dir(tmp_path, ca_file, daemon.table())
    postconf(pf.path, "-P", "-e", "smtp/unix/smtp_tls_security_level=none")
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path))
    assert report.status == 1, report
    assert report.has(
        "FAIL: smtp_tls_security_level (master.cf smtp/unix -o): none: mail to every domain"
    ), report


def test_ca_path_is_looked_for_inside_the_chroot(
    tmp_path: Path, ca_file: Path, daemon: Daemon
) -> None:
    pf = make_postfix_dir(tmp_path, ca_file, daemon.table())
    pf.set(smtp_tls_CAfile="", smtp_tls_CApath="/etc/ssl/certs")
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path))
    assert report.status == 1, report
    inside = pf.queue / "etc/ssl/certs"
    assert report.has(
        f"FAIL: smtp_tls_CApath: /etc/ssl/certs: {inside} (inside the smtp chroot) cannot be"
        " read (No such file or directory); set smtp_tls_CAfile"
    ), report

    # What Debian's start script does: copy the directory into the chroot.
    inside.mkdir(parents=True)
    digest = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(ca_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    shutil.copy(ca_file, inside / f"{digest}.0")
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path))
    assert report.status == 0, report
    assert (
        f"OK: smtp_tls_CApath: /etc/ssl/certs: {inside} (inside the smtp chroot): 1 hashed"
        " certificates" in report.lines
    )


def test_dane_without_dnssec_support_level_fails_and_resolvers_are_checked(
    tmp_path: Path, ca_file: Path, daemon: Daemon, bed: Bed
) -> None:
    pf = make_postfix_dir(tmp_path, ca_file, daemon.table())
    # The chrooted smtp client's resolv.conf: a port where nobody answers.
    (pf.queue / "etc").mkdir()
    (pf.queue / "etc/resolv.conf").write_text("nameserver 127.0.0.9\n")
    config = tmp_path / "dane.toml"
    nameservers = json.dumps(bed.validating_nameservers)
    config.write_text(
        f'listen = ["{daemon.inet}"]\n[dns]\nnameservers = {nameservers}\n'
        f'[dane]\nenabled = true\ncheck_name = "{DANE_ZONE}"\n'
    )
    report = run_doctor("-c", str(config), "--postfix-config", str(pf.path))
    assert report.status == 1, report
    assert report.has(
        f"FAIL: smtp_dns_support_level: empty (the default), but dane.enabled = true in {config}:"
    ), report
    assert report.has(
        f"OK: {config} dns.nameservers: {bed.validating_nameservers[0].replace(':', ' port ')}"
        f" validates DNSSEC (AD bit for {DANE_ZONE})"
    ), report
    assert report.has(
        f"FAIL: {pf.queue}/etc/resolv.conf: nameserver 127.0.0.9: no AD bit for {DANE_ZONE}:"
    ), report

    # No resolv.conf in the chroot: the chrooted smtp client has no nameserver at all.
    pf.set(smtp_dns_support_level="dnssec")
    (pf.queue / "etc/resolv.conf").unlink()
    report = run_doctor("-c", str(config), "--postfix-config", str(pf.path))
    assert "OK: smtp_dns_support_level: dnssec" in report.lines
    assert report.has(
        f"FAIL: {pf.queue}/etc/resolv.conf: no usable nameserver (cannot open"
        f" {pf.queue}/etc/resolv.conf):"
    ), report


def test_daemon_resolver_that_does_not_validate_fails_with_dane(
    tmp_path: Path, ca_file: Path, daemon: Daemon, bed: Bed
) -> None:
    pf = make_postfix_dir(tmp_path, ca_file, daemon.table())
    pf.set(smtp_dns_support_level="dnssec")
    config = tmp_path / "dane.toml"
    config.write_text(
        f'listen = ["{daemon.inet}"]\n[dns]\nnameservers = {json.dumps(bed.resolver_nameservers)}'
        f'\n[dane]\nenabled = true\ncheck_name = "{DANE_ZONE}"\n'
    )
    report = run_doctor("-c", str(config), "--postfix-config", str(pf.path))
    assert report.status == 1, report
    assert report.has(f"FAIL: {config} dns.nameservers: ") and (
        f"no AD bit for {DANE_ZONE}: the daemon finds no DANE policy" in report.stdout
    ), report


def test_tlsrpt_on_with_postfix_37_fails_twice(
    tmp_path: Path, ca_file: Path, dane_daemon: Daemon
) -> None:
    # dane_daemon's [maps.tlsrpt] has tlsrpt = true: its answer carries attributes 3.7 refuses.
    table = dane_daemon.table("tlsrpt")
    pf = make_postfix_dir(tmp_path, ca_file, table)
    report = run_doctor(
        "-c", str(dane_daemon.config_path), "--postfix-config", str(pf.path), "--key", ENFORCE
    )
    assert report.status == 1, report
    assert (
        f"FAIL: {dane_daemon.config_path} maps.tlsrpt.tlsrpt: true, but Postfix 3.7.11 rejects"
        " the TLSRPT attributes (3.10 or newer) and defers every mail to an MTA-STS domain; set"
        " maps.tlsrpt.tlsrpt = false" in report.lines
    ), report
    assert report.has(f"FAIL: smtp_tls_policy_maps {table}: postmap -q {ENFORCE} {table}: "), report
    assert (
        "attribute 'policy_type' needs Postfix 3.10 or newer (this is 3.7.11); Postfix defers"
        " such mail" in report.stdout
    ), report


def test_json_report_and_exit_2_when_postconf_cannot_read_the_directory(
    tmp_path: Path, ca_file: Path, daemon: Daemon
) -> None:
    pf = make_postfix_dir(tmp_path, ca_file, "")
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(pf.path), "--json")
    assert report.status == 1, report
    parsed = json.loads(report.stdout)
    assert parsed["exit_status"] == 1
    assert {
        "status": "FAIL",
        "subject": "smtp_tls_policy_maps",
        "message": "(empty): no socketmap: table, so Postfix never asks the daemon; add"
        f" socketmap:{daemon.inet}:postfix",
    } in parsed["findings"]

    missing = tmp_path / "nonexistent"
    report = run_doctor("-c", str(daemon.config_path), "--postfix-config", str(missing))
    assert report.status == 2, report
    assert report.stdout == ""
    assert report.stderr.startswith("postfix-mtasts doctor: ")
    assert f"postconf: fatal: open {missing}/" in report.stderr
    assert report.stderr.rstrip().endswith("No such file or directory"), report
