"""``postfix-mtasts query --check-mx`` end to end: the real CLI, the bed's DNS and policy hosts, and
STARTTLS receivers on port 25 of loopback addresses (tests/smtpbed.py).

Each case publishes one domain whose single MX host is one receiver, then checks the verdict
printed (plain and JSON), and that Postfix's own posttls-finger reaches the same verdict against
the same receiver.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bed import Bed, Response, Scenario, policy_text
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from smtpbed import SMTPBed

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
    argv = [
        sys.executable,
        "-m",
        "postfix_mtasts",
        "query",
        "--check-mx",
        "--nameserver",
        nameserver or bed.resolver_nameservers[0],
        "--ca-file",
        bed.ca_file,
        "--https-timeout",
        "5",
        *options,
        *domains,
    ]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


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
