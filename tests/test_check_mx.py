"""``postfix-mtasts query --check-mx`` end to end: the real CLI, the bed's DNS and policy hosts, and
STARTTLS receivers on port 25 of loopback addresses (tests/smtpbed.py).

Each case publishes one domain whose single MX host is one receiver, then checks the verdict
printed (plain and JSON), and that Postfix's own posttls-finger reaches the same verdict against
the same receiver.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import querycli
from bed import EE, USABLE_EE, Bed, Response, Scenario, policy_text
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from smtpbed import SMTPBed

from postfix_mtasts.checkmx import postfix_name_match, printable, rfc8461_name_match

REPO = Path(__file__).resolve().parent.parent
POSTTLS_FINGER = "/usr/sbin/posttls-finger"
ALLOWED_VERBS = {"EHLO", "STARTTLS", "QUIT"}


@pytest.fixture(scope="session")
def smtp_bed(bed: Bed) -> Iterator[SMTPBed]:
    receivers = SMTPBed(bed.ca)
    try:
        yield receivers
    finally:
        receivers.close()


@dataclass
class Case:
    domain: str
    host: str
    address: str
    kind: str


def publish(
    bed: Bed,
    smtp: SMTPBed,
    kind: str,
    *,
    listed: bool = True,
    mode: str = "enforce",
    policy: bool = True,
) -> Case:
    """A fresh domain in mtasts.test whose one MX host is a new receiver of ``kind``, with an
    MTA-STS policy listing that host (or, ``listed`` False, only another one)."""
    domain = bed.unique_domain("cmx")
    host = f"mx.{domain}"
    receiver = smtp.start(host, kind)
    bed.dns_set(domain, "MX", [f"10 {host}."])
    bed.dns_set(host, "A", [receiver.address])
    if policy:
        mx = [host] if listed else [f"other.{domain}"]
        body = policy_text(mode, mx)
        bed.add_domain(domain, Scenario(txt=("v=STSv1; id=cmx1;",), response=Response(body=body)))
    return Case(domain, host, receiver.address, kind)


def check_mx(
    bed: Bed, *domains: str, options: tuple[str, ...] = (), nameserver: str = ""
) -> subprocess.CompletedProcess[str]:
    """``query --check-mx``; private addresses only with ``options`` that allow them."""
    return querycli.query(
        bed,
        "--check-mx",
        *options,
        *domains,
        nameserver=nameserver or None,
        private=False,
        https_timeout=5,
        timeout=120,
    )


def check_mx_json(
    bed: Bed, domain: str, options: tuple[str, ...] = (), **kw: Any
) -> dict[str, Any]:
    result = check_mx(bed, domain, options=("--json", *options), **kw)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result
    data: dict[str, Any] = json.loads(lines[0])
    assert data["exit_status"] == result.returncode
    return data


PRIVATE = ("--allow-private-addresses",)

# kind, listed in the policy, what Postfix does, words of the reason
SECURE_CASES = [
    ("valid", True, "deliver", "certificate verified -> delivers"),
    ("wrongname", True, "defer", "certificate name mismatch -> Postfix defers"),
    ("selfsigned", True, "defer", "certificate not trusted"),
    ("expired", True, "defer", "certificate has expired"),
    ("notls", True, "defer", "STARTTLS not offered -> Postfix defers"),
    ("valid", False, "defer", "certificate name mismatch -> Postfix defers"),
]


@pytest.fixture(scope="module")
def secure_cases(bed: Bed, smtp_bed: SMTPBed) -> list[Case]:
    return [publish(bed, smtp_bed, kind, listed=listed) for kind, listed, _, _ in SECURE_CASES]


@pytest.mark.parametrize(
    "index",
    range(len(SECURE_CASES)),
    ids=[f"{k}{'' if listed else '-unlisted'}" for k, listed, _, _ in SECURE_CASES],
)
def test_check_mx_says_what_postfix_does_with_a_secure_answer(
    bed: Bed, secure_cases: list[Case], index: int
) -> None:
    kind, listed, outcome, reason = SECURE_CASES[index]
    case = secure_cases[index]
    result = check_mx(bed, case.domain, options=PRIVATE)
    out = result.stdout
    assert (
        f"postfix answer: OK secure match={case.host if listed else 'other.' + case.domain}" in out
    )
    assert (
        f"MX {case.host} (preference 10), {'listed' if listed else 'NOT listed'} in the policy"
        in out
    )
    assert f"=> {outcome}: {case.address}: " in out, out
    assert reason in out, out
    assert result.returncode == (0 if outcome == "deliver" else 1), result
    if kind == "notls":
        assert "STARTTLS: not offered" in out
    else:
        assert "STARTTLS: offered" in out
        assert "TLS: TLSv1.3" in out


@pytest.mark.parametrize(
    "index",
    range(len(SECURE_CASES)),
    ids=[f"{k}{'' if listed else '-unlisted'}" for k, listed, _, _ in SECURE_CASES],
)
def test_check_mx_json_gives_the_same_verdicts(
    bed: Bed, secure_cases: list[Case], index: int
) -> None:
    kind, listed, outcome, reason = SECURE_CASES[index]
    case = secure_cases[index]
    data = check_mx_json(bed, case.domain, options=PRIVATE)
    assert data["domain"] == case.domain and data["mx_source"] == "mx"
    [host] = data["hosts"]
    assert host["host"] == case.host and host["preference"] == 10
    assert host["in_policy"] is listed
    assert host["postfix"] == outcome
    [probe] = host["addresses"]
    assert probe["address"] == case.address
    assert probe["postfix"] == outcome and reason in probe["reason"]
    assert probe["starttls"] is (kind != "notls")
    if kind == "notls":
        assert probe["certificate"] is None
        return
    cert = probe["certificate"]
    assert cert["verified"] is (kind in ("valid", "wrongname"))
    assert cert["matches_mx_host"] is (kind != "wrongname")
    assert probe["tls_version"].startswith("TLSv1.")
    assert probe["cipher"]


# --------------------------------------------------------------------------------------------------
# posttls-finger, Postfix's own checks, on the same receivers.


def finger_verdict(bed: Bed, case: Case, level: str, *args: str) -> tuple[str, str]:
    """What posttls-finger (Postfix's own TLS client code) finds at ``level``: ("deliver",
    "verified") when it reports a verified connection, else ("defer", the cause it names)."""
    argv = [POSTTLS_FINGER, "-t", "5", "-T", "5", "-l", level, *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    text = result.stdout + result.stderr
    if "Verified TLS connection established" in text:
        return "deliver", "verified"
    for words, cause in FINGER_CAUSES.items():
        if words in text:
            return "defer", cause
    assert "TLS connection established" not in text, text
    # No TLS at all: the EHLO reply came and offered no STARTTLS.
    assert "< 250 " in text and "< 250-STARTTLS" not in text and "> STARTTLS" not in text, text
    return "defer", "no-starttls"


# posttls-finger's words for why a certificate failed, and ours.
FINGER_CAUSES = {
    "hostname mismatch": "name mismatch",
    "certificate has expired": "certificate has expired",
    "untrusted issuer": "certificate not trusted",
    "TLSA": "no TLSA record matches",
}
OUR_CAUSES = {
    "certificate verified": "verified",
    "STARTTLS not offered": "no-starttls",
    "certificate has expired": "certificate has expired",
    "name mismatch": "name mismatch",
    "certificate not trusted": "certificate not trusted",
    "no TLSA record matches": "no TLSA record matches",
}


def our_cause(reason: str) -> str:
    # The most specific first: "certificate not trusted (certificate has expired)" is expiry.
    causes = [cause for words, cause in OUR_CAUSES.items() if words in reason]
    assert causes, reason
    return causes[0]


@pytest.mark.parametrize(
    "index",
    range(len(SECURE_CASES)),
    ids=[f"{k}{'' if listed else '-unlisted'}" for k, listed, _, _ in SECURE_CASES],
)
def test_posttls_finger_agrees_with_check_mx(
    bed: Bed, secure_cases: list[Case], index: int
) -> None:
    case = secure_cases[index]
    data = check_mx_json(bed, case.domain, options=PRIVATE)
    answer = data["postfix_answer"].split()
    patterns = answer[2].removeprefix("match=").split(":")
    host = data["hosts"][0]
    finger = finger_verdict(
        bed, case, "secure", "-F", bed.ca_file, "-s", case.host, f"[{case.address}]:25", *patterns
    )
    assert finger == (host["postfix"], our_cause(host["reason"]))


def test_check_mx_sends_only_ehlo_starttls_and_quit(bed: Bed, smtp_bed: SMTPBed) -> None:
    case = publish(bed, smtp_bed, "valid")
    assert check_mx(bed, case.domain, options=PRIVATE).returncode == 0
    [receiver] = [r for r in smtp_bed.receivers if r.address == case.address]
    verbs = [command.split(" ")[0] for command in receiver.commands]
    assert verbs == ["EHLO", "STARTTLS", "EHLO", "QUIT"]


# --------------------------------------------------------------------------------------------------
# DANE: TLSA records in the signed zone dane.test, through the validating resolver.


def spki_sha256(der: bytes) -> bytes:
    key = x509.load_der_x509_certificate(der).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def publish_dane(bed: Bed, smtp: SMTPBed, kind: str, tlsa: str | None) -> tuple[Case, bytes]:
    """A fresh domain in dane.test whose one MX host is a receiver of ``kind``, with the TLSA
    record ``tlsa`` ("3 1 1 <digest of that receiver's key>" when None)."""
    domain = bed.unique_dane_domain("cmx")
    host = f"mx.{domain}"
    receiver = smtp.start(host, kind)
    pin = spki_sha256(receiver.leaf_der)
    bed.dns_set(domain, "MX", [f"10 {host}."])
    bed.dns_set(host, "A", [receiver.address])
    bed.dns_set(f"_25._tcp.{host}", "TLSA", [tlsa or f"3 1 1 {pin.hex()}"])
    return Case(domain, host, receiver.address, kind), pin


DANE_OPTIONS = ("--dane", "--allow-private-addresses")


@pytest.mark.parametrize(
    ("kind", "pinned", "outcome"),
    [("valid", True, "deliver"), ("expired", True, "deliver"), ("valid", False, "defer")],
    ids=["match", "match-expired", "tlsa-mismatch"],
)
def test_check_mx_with_dane_checks_the_tlsa_records_against_the_chain(
    bed: Bed, smtp_bed: SMTPBed, kind: str, pinned: bool, outcome: str
) -> None:
    # DANE-EE (3 1 1) pins the key: neither names nor dates count (RFC 7672 §3.1.1).
    tlsa = None if pinned else bed.expand(USABLE_EE)  # the bed's DANE certificate, not this one
    case, pin = publish_dane(bed, smtp_bed, kind, tlsa)
    nameserver = bed.validating_nameservers[0]
    result = check_mx(bed, case.domain, options=DANE_OPTIONS, nameserver=nameserver)
    assert "postfix answer: OK dane-only" in result.stdout, result
    assert f"=> {outcome}: {case.address}: dane-only: " in result.stdout, result.stdout
    if pinned:
        assert "TLSA (1): matches 3 1 1" in result.stdout
    else:
        assert "TLSA (1): none matches" in result.stdout
        assert "no TLSA record matches -> Postfix defers" in result.stdout
    assert result.returncode == (0 if outcome == "deliver" else 1)

    data = check_mx_json(bed, case.domain, options=DANE_OPTIONS, nameserver=nameserver)
    [host] = data["hosts"]
    [probe] = host["addresses"]
    assert host["postfix"] == outcome
    assert probe["tlsa"]["secure"] is True and probe["tlsa"]["state"] == "usable"
    assert bool(probe["tlsa"]["matched"]) is pinned

    # Postfix's fingerprint level with the SHA-256 of the key is what DANE-EE 3 1 1 checks.
    wanted = pin if pinned else bytes.fromhex(bed.expand(EE))
    fingerprint = ":".join(f"{byte:02X}" for byte in wanted)
    finger = finger_verdict(
        bed, case, "fingerprint", "-d", "sha256", f"[{case.address}]:25", fingerprint
    )
    assert finger[0] == outcome


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [("intermediate", "deliver"), ("valid", "defer")],
    ids=["match", "mismatch"],
)
def test_check_mx_with_dane_ta_needs_the_anchor_in_the_chain_presented(
    bed: Bed, smtp_bed: SMTPBed, tmp_path: Path, kind: str, outcome: str
) -> None:
    # DANE-TA (2 0 1) pins an intermediate CA: matched only when the server sends it and it
    # issued the leaf (RFC 7672 §3.1.2). The "valid" receiver's leaf comes from the root.
    case, _ = publish_dane(bed, smtp_bed, kind, None)
    if kind == "intermediate":
        anchor = next(r for r in smtp_bed.receivers if r.address == case.address).issuer_pem
    else:
        # Another intermediate of the same root, which did not issue this leaf.
        anchor = smtp_bed.start("anchor.example", "intermediate").issuer_pem
    der = ssl.PEM_cert_to_DER_cert(anchor.decode())
    bed.dns_set(f"_25._tcp.{case.host}", "TLSA", [f"2 0 1 {hashlib.sha256(der).hexdigest()}"])
    nameserver = bed.validating_nameservers[0]
    data = check_mx_json(bed, case.domain, options=DANE_OPTIONS, nameserver=nameserver)
    [probe] = data["hosts"][0]["addresses"]
    assert data["postfix_answer"] == "OK dane-only"
    assert probe["postfix"] == outcome, probe
    assert probe["tlsa"]["matched"].startswith("2 0 1 ") is (outcome == "deliver")

    # posttls-finger with that anchor as its only trust anchor (-A) checks the same chain.
    anchor_file = tmp_path / "anchor.pem"
    anchor_file.write_bytes(anchor)
    finger = finger_verdict(
        bed,
        case,
        "secure",
        "-A",
        str(anchor_file),
        "-s",
        case.host,
        f"[{case.address}]:25",
        case.host,
    )
    assert finger[0] == outcome


# --------------------------------------------------------------------------------------------------
# Other answers and other MX set-ups.


def test_check_mx_opportunistic_answer_delivers_even_without_starttls(
    bed: Bed, smtp_bed: SMTPBed
) -> None:
    # A testing policy is answered NOTFOUND by default: Postfix's own level (may) applies.
    case = publish(bed, smtp_bed, "notls", mode="testing")
    result = check_mx(bed, case.domain, options=PRIVATE)
    assert "postfix answer: NOTFOUND" in result.stdout
    assert "opportunistic, certificate not checked -> delivers (without TLS)" in result.stdout
    assert result.returncode == 0


def test_check_mx_without_mx_records_probes_the_domain_itself(bed: Bed, smtp_bed: SMTPBed) -> None:
    domain = bed.unique_domain("cmximplicit")
    receiver = smtp_bed.start(domain, "valid")
    bed.dns_set(domain, "A", [receiver.address])
    bed.add_domain(
        domain,
        Scenario(
            txt=("v=STSv1; id=i1;",), response=Response(body=policy_text("enforce", [domain]))
        ),
    )
    result = check_mx(bed, domain, options=PRIVATE)
    assert f"no MX records: {domain} itself is the mail host (RFC 5321 §5.1)" in result.stdout
    assert f"MX {domain}, listed in the policy" in result.stdout
    assert f"=> deliver: {receiver.address}:" in result.stdout
    assert result.returncode == 0
    data = check_mx_json(bed, domain, options=PRIVATE)
    assert data["mx_source"] == "implicit" and data["hosts"][0]["preference"] is None


def test_check_mx_json_prints_one_object_per_domain_and_exits_with_the_worst(
    bed: Bed, secure_cases: list[Case]
) -> None:
    good, bad = secure_cases[0], secure_cases[1]  # valid, wrongname
    result = check_mx(bed, good.domain, bad.domain, options=("--json", *PRIVATE))
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["domain"] for o in objects] == [good.domain, bad.domain]
    assert [o["exit_status"] for o in objects] == [0, 1]
    assert result.returncode == 1


def test_check_mx_null_mx_says_the_domain_takes_no_mail(bed: Bed) -> None:
    domain = bed.unique_domain("cmxnull")
    bed.dns_set(domain, "MX", ["0 ."])
    result = check_mx(bed, domain, options=PRIVATE)
    assert "null MX (RFC 7505): the domain accepts no mail" in result.stdout
    assert result.returncode == 1
    data = check_mx_json(bed, domain, options=PRIVATE)
    assert data["mx_source"] == "null-mx" and data["hosts"] == []


def test_check_mx_probes_at_most_ten_mx_hosts(bed: Bed) -> None:
    # An attacker's domain with many MX hosts: the first ten (by preference) are looked at, the
    # rest only listed. These names have no address, so each probed one is skipped at once.
    domain = bed.unique_domain("cmxmany")
    hosts = [f"mx{n:02d}.{domain}" for n in range(14)]
    bed.dns_set(domain, "MX", [f"{n} {host}." for n, host in enumerate(hosts)])
    data = check_mx_json(bed, domain, options=PRIVATE)
    assert [h["host"] for h in data["hosts"]] == hosts
    for host in data["hosts"][:10]:
        assert host["postfix"] != "not-probed" and "Postfix skips this MX host" in host["reason"]
    for host in data["hosts"][10:]:
        assert host["postfix"] == "not-probed"
        assert host["reason"] == "not probed: only the first 10 MX hosts are"
    assert data["exit_status"] == 1


def test_check_mx_does_not_probe_private_addresses_unless_allowed(
    bed: Bed, smtp_bed: SMTPBed
) -> None:
    case = publish(bed, smtp_bed, "valid")
    data = check_mx_json(bed, case.domain)
    [probe] = data["hosts"][0]["addresses"]
    assert probe["postfix"] == "not-probed"
    assert "allow_private_addresses" in probe["reason"]
    assert data["exit_status"] == 1
    assert [r.commands for r in smtp_bed.receivers if r.address == case.address] == [[]]


def test_check_mx_dns_failure_is_temporary(bed: Bed) -> None:
    result = check_mx(
        bed,
        bed.unique_domain("cmxdead"),
        options=(*PRIVATE, "--dns-timeout", "1"),
        nameserver=bed.dead_nameserver,
    )
    assert result.returncode == 2
    assert "MX lookup failed" in result.stdout


# --------------------------------------------------------------------------------------------------
# A hostile receiver cannot hold the probe, fill its memory or the terminal.


@pytest.mark.parametrize(
    ("kind", "outcome", "stopped"),
    [
        ("endless-banner", "unreachable", "banner: reply of more than 100 lines"),
        ("huge-ehlo", "unreachable", "EHLO: reply line longer than 1024 bytes"),
        ("silent-tls", "defer", "TLS handshake: no answer in time"),
        ("starttls-injection", "defer", "STARTTLS: the server sent data before the TLS handshake"),
    ],
)
def test_check_mx_hostile_receiver_is_bounded(
    bed: Bed, smtp_bed: SMTPBed, kind: str, outcome: str, stopped: str
) -> None:
    case = publish(bed, smtp_bed, kind)
    started = time.monotonic()
    result = check_mx(bed, case.domain, options=(*PRIVATE, "--smtp-timeout", "3"))
    # Three seconds of probe, plus the start of Python and the policy fetch on a busy machine.
    assert time.monotonic() - started < 30
    assert f"stopped: {stopped}" in result.stdout, result.stdout
    assert f"=> {outcome}: " in result.stdout
    assert result.returncode == 1
    assert len(result.stdout) < 5000


def test_check_mx_bounds_the_probes_of_one_mx_host_as_a_whole(bed: Bed, smtp_bed: SMTPBed) -> None:
    # Three addresses that never answer the handshake, 3 s each, 6 s for the host: the third
    # gets nothing.
    case = publish(bed, smtp_bed, "silent-tls")
    more = [smtp_bed.start(case.host, "silent-tls").address for _ in range(2)]
    bed.dns_set(case.host, "A", [case.address, *more])
    started = time.monotonic()
    data = check_mx_json(bed, case.domain, options=(*PRIVATE, "--smtp-timeout", "3"))
    assert time.monotonic() - started < 40
    errors = sorted(probe["error"] for probe in data["hosts"][0]["addresses"])
    assert len(errors) == 3
    assert any(error.endswith("deadline passed") for error in errors), errors
    assert "TLS handshake: no answer in time" in errors
    assert data["hosts"][0]["postfix"] == "defer"


def test_check_mx_shows_remote_text_without_control_characters(bed: Bed, smtp_bed: SMTPBed) -> None:
    case = publish(bed, smtp_bed, "nasty-banner")
    result = check_mx(bed, case.domain, options=PRIVATE)
    [banner] = [line for line in result.stdout.splitlines() if "banner:" in line]
    assert banner.strip().startswith("banner: evil\\x1b[2J\\x1b]0;owned\\x07\\x00AAA")
    assert banner.endswith("...") and len(banner.strip()) <= len("banner: ") + 203
    assert all(char.isprintable() for char in result.stdout.replace("\n", ""))
    data = check_mx_json(bed, case.domain, options=PRIVATE)
    assert data["hosts"][0]["addresses"][0]["banner"].startswith("evil\\x1b")


# --------------------------------------------------------------------------------------------------
# The name rules and the printing, pure.


@pytest.mark.parametrize(
    ("names", "host", "matches"),
    [
        (["mx.example.com"], "mx.example.com", True),
        (["MX.Example.COM."], "mx.example.com", True),
        (["*.example.com"], "mx.example.com", True),
        (["*.example.com"], "a.mx.example.com", False),  # one label only (RFC 8461 §4.2)
        (["*.example.com"], "example.com", False),
        (["m*.example.com"], "mx.example.com", False),  # a wildcard is a whole label or nothing
        (["mx.example.com.evil"], "mx.example.com", False),
    ],
)
def test_rfc8461_name_match_takes_a_wildcard_for_one_whole_left_most_label(
    names: list[str], host: str, matches: bool
) -> None:
    assert rfc8461_name_match(names, host) is matches


@pytest.mark.parametrize(
    ("names", "patterns", "matches"),
    [
        (["mx.example.net"], ["mx.example.net"], True),
        (["a.b.example.net"], [".example.net"], True),  # Postfix's dot form: any depth
        (["example.net"], [".example.net"], False),
        (["*.example.net"], ["mx.example.net"], True),
        (["*.example.net"], [".example.net"], True),
        (["mx.example.net"], ["other.example.net", "mx.example.org"], False),
    ],
)
def test_postfix_name_match_follows_postfix_match_rules(
    names: list[str], patterns: list[str], matches: bool
) -> None:
    assert postfix_name_match(names, patterns) is matches


def test_printable_escapes_controls_and_cuts_long_text() -> None:
    assert printable("ok \x1b[2J\x00\u202e") == "ok \\x1b[2J\\x00\\u202e"
    assert printable(b"\xff\r\n") == "\\xff\\r\\n"
    cut = printable("A" * 1000)
    assert cut == "A" * 197 + "..."
    assert printable("\x01" * 100, 20) == "\\x01" * 4 + "..."


def test_no_receiver_was_ever_sent_a_mail_command(smtp_bed: SMTPBed) -> None:
    # Last in this module: every probe of every test above, none got MAIL, RCPT or DATA.
    seen = {command.split(" ")[0].upper() for r in smtp_bed.receivers for command in r.commands}
    assert seen <= ALLOWED_VERBS
    assert {"EHLO", "STARTTLS", "QUIT"} <= seen
