"""``postfix-mtasts query`` end to end: the real CLI against the bed's DNS and HTTPS servers.

One test per outcome a postmaster can meet; the domains and what they publish come from
``bed.SCENARIOS``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import querycli
from bed import SCENARIOS, Bed, domain_of

REPO = Path(__file__).resolve().parent.parent

EXIT_POLICY = 0
EXIT_NO_POLICY = 1
EXIT_TEMPORARY = 2

HTTPS_TIMEOUT = querycli.HTTPS_TIMEOUT


def query(
    bed: Bed, *domains: str, nameserver: str | None = None, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m postfix_mtasts query`` against the bed, the way a postmaster would."""
    return querycli.query(bed, *options, *domains, nameserver=nameserver)


def query_json(
    bed: Bed, domain: str, *, options: tuple[str, ...] = (), **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    result = query(bed, domain, options=("--json", *options), **kwargs)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result
    return result.returncode, json.loads(lines[0])


def one_stderr_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    return lines[0]


def policy_host(label: str) -> str:
    return f"mta-sts.{domain_of(label)}"


# --------------------------------------------------------------------------------------------------
# A policy is found.

FOUND = ["enforce", "testing", "none", "cname", "othertxt"]


@pytest.mark.parametrize("label", FOUND)
def test_query_prints_the_policy_found(bed: Bed, label: str) -> None:
    scenario = SCENARIOS[label]
    domain = domain_of(label)
    before = bed.https.request_count(policy_host(label))
    result = query(bed, domain)
    assert result.returncode == EXIT_POLICY, result
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"{domain}: {scenario.mode} policy (id {scenario.record_id}, max_age {scenario.max_age})"
    )
    assert f"v=STSv1; id={scenario.record_id};" in result.stdout
    for mx in scenario.mx:
        assert f"mx: {mx}" in result.stdout
    assert any(line.startswith("  postfix answer: ") for line in lines)
    # RFC 8461 §3.3: one GET of the policy, no more.
    assert bed.https.request_count(policy_host(label)) == before + 1


@pytest.mark.parametrize("label", FOUND)
def test_query_json_describes_the_policy_found(bed: Bed, label: str) -> None:
    scenario = SCENARIOS[label]
    assert scenario.response is not None
    status, data = query_json(bed, domain_of(label))
    assert status == EXIT_POLICY
    assert data["domain"] == domain_of(label)
    assert data["record"] == {"version": "STSv1", "id": scenario.record_id, "extensions": []}
    assert data["record_text"] == f"v=STSv1; id={scenario.record_id};"
    assert data["policy"] == {
        "version": "STSv1",
        "mode": scenario.mode,
        "mx": list(scenario.mx),
        "max_age": scenario.max_age,
        "extensions": [],
    }
    assert data["policy_text"] == scenario.response.body.decode()
    assert data["error"] is None
    assert data["tls_report_failure"] == ""


def test_query_enforce_gives_the_postfix_secure_answer(bed: Bed) -> None:
    _, data = query_json(bed, domain_of("enforce"))
    answer = data["postfix_answer"]
    # The socketmap reply; Postfix writes the MTA-STS wildcard *.example.net as .example.net.
    assert answer.startswith(f"OK secure match=mail.{domain_of('enforce')}:.example.net ")
    assert "servername=hostname" in answer.split()


@pytest.mark.parametrize("label", ["testing", "none"])
def test_query_testing_and_none_are_not_enforced_by_default(bed: Bed, label: str) -> None:
    assert query_json(bed, domain_of(label))[1]["postfix_answer"] == "NOTFOUND "


def test_query_accepts_any_case_and_a_trailing_dot(bed: Bed) -> None:
    result = query(bed, "Enforce.MTASTS.Test.")
    assert result.returncode == EXIT_POLICY, result
    assert result.stdout.startswith(f"{domain_of('enforce')}: enforce policy ")


# --------------------------------------------------------------------------------------------------
# No usable policy.


@dataclass(frozen=True)
class Failure:
    label: str
    phrase: str
    error_type: str
    cause: str  # a regular expression the cause in parentheses must contain (case-insensitive)
    record_found: bool  # the TXT record was valid, so it is still shown
    tls_report: str  # RFC 8460 result type
    requests: int  # GETs that reach the policy host


FAILURES = [
    Failure(
        "norecord",
        "no MTA-STS record",
        "NoRecordError",
        r"_mta-sts\.norecord\.mtasts\.test.*NXDOMAIN",
        False,
        "",
        0,
    ),
    Failure(
        "nosemicolon",
        "no MTA-STS record",
        "NoRecordError",
        r"_mta-sts\.nosemicolon\.mtasts\.test",
        False,
        "",
        0,
    ),
    Failure(
        "tworecords",
        "more than one MTA-STS record",
        "MultipleRecordsError",
        r"_mta-sts\.tworecords\.mtasts\.test",
        False,
        "",
        0,
    ),
    Failure("badrecord", "invalid MTA-STS record", "RecordSyntaxError", r"bad-id!", False, "", 0),
    Failure("noid", "invalid MTA-STS record", "RecordSyntaxError", r"\bid\b|field", False, "", 0),
    Failure(
        "notfound404",
        "no policy served",
        "NoPolicyError",
        r"https://mta-sts\.notfound404\.mtasts\.test/\.well-known/mta-sts\.txt.*HTTP 404",
        True,
        "sts-policy-fetch-error",
        1,
    ),
    Failure(
        "error500",
        "policy fetch failed",
        "PolicyFetchError",
        r"\b500\b",
        True,
        "sts-policy-fetch-error",
        1,
    ),
    Failure(
        "redirect",
        "policy fetch failed",
        "PolicyFetchError",
        r"redirect|\b301\b",
        True,
        "sts-policy-fetch-error",
        1,
    ),
    Failure(
        "wrongtype",
        "policy fetch failed",
        "PolicyFetchError",
        r"text/html|media type|content.type",
        True,
        "sts-policy-fetch-error",
        1,
    ),
    Failure(
        "oversized",
        "policy fetch failed",
        "PolicyFetchError",
        r"larger than 65536 bytes",
        True,
        "sts-policy-fetch-error",
        1,
    ),
    # The certificate is rejected in the TLS handshake: no request is ever sent.
    Failure(
        "wrongname",
        "policy fetch failed",
        "PolicyFetchError",
        r"certificate",
        True,
        "sts-webpki-invalid",
        0,
    ),
    Failure(
        "expired",
        "policy fetch failed",
        "PolicyFetchError",
        r"certificate.*expired|expired.*certificate",
        True,
        "sts-webpki-invalid",
        0,
    ),
    Failure(
        "untrusted",
        "policy fetch failed",
        "PolicyFetchError",
        r"certificate",
        True,
        "sts-webpki-invalid",
        0,
    ),
    Failure(
        "slow",
        "policy fetch failed",
        "PolicyFetchError",
        r"timed out|timeout",
        True,
        "sts-policy-fetch-error",
        1,
    ),
    Failure(
        "hang",
        "policy fetch failed",
        "PolicyFetchError",
        r"timed out|timeout",
        True,
        "sts-policy-fetch-error",
        1,
    ),
    Failure(
        "nohost",
        "policy fetch failed",
        "PolicyFetchError",
        r"mta-sts\.nohost\.mtasts\.test",
        True,
        "sts-policy-fetch-error",
        0,
    ),
    Failure(
        "badpolicy",
        "invalid policy",
        "PolicySyntaxError",
        r"mode|sometimes",
        True,
        "sts-policy-invalid",
        1,
    ),
]


@pytest.mark.parametrize("failure", FAILURES, ids=[f.label for f in FAILURES])
def test_query_reports_why_there_is_no_policy(bed: Bed, failure: Failure) -> None:
    domain = domain_of(failure.label)
    host = policy_host(failure.label)
    before = bed.https.request_count(host)
    started = time.monotonic()
    result = query(bed, domain)
    elapsed = time.monotonic() - started
    assert result.returncode == EXIT_NO_POLICY, result
    line = one_stderr_line(result)
    assert line.startswith(f"{domain}: {failure.phrase} ("), line
    assert line.endswith(")"), line
    assert re.search(failure.cause, line, re.IGNORECASE), line
    if failure.record_found:
        # The record is shown even though the policy failed.
        assert f"id={SCENARIOS[failure.label].record_id}" in result.stdout
    else:
        assert "policy (id" not in result.stdout
    assert bed.https.request_count(host) == before + failure.requests
    # Slow drip and hanging hosts: the deadline holds (plus interpreter start-up).
    assert elapsed < HTTPS_TIMEOUT + 8


@pytest.mark.parametrize("failure", FAILURES, ids=[f.label for f in FAILURES])
def test_query_json_reports_why_there_is_no_policy(bed: Bed, failure: Failure) -> None:
    domain = domain_of(failure.label)
    status, data = query_json(bed, domain)
    assert status == EXIT_NO_POLICY
    assert data["domain"] == domain
    assert data["policy"] is None
    assert data["error"]["type"] == failure.error_type
    assert data["error"]["message"].startswith(f"{domain}: {failure.phrase} (")
    assert data["tls_report_failure"] == failure.tls_report
    assert data["postfix_answer"] == "NOTFOUND "
    if failure.record_found:
        assert data["record"]["id"] == SCENARIOS[failure.label].record_id
    else:
        assert data["record"] is None


# --------------------------------------------------------------------------------------------------
# Temporary failures and several domains.


def test_query_dns_server_down_is_a_temporary_error(bed: Bed) -> None:
    domain = domain_of("enforce")
    started = time.monotonic()
    result = query(bed, domain, nameserver=bed.dead_nameserver, options=("--dns-timeout", "1"))
    assert result.returncode == EXIT_TEMPORARY, result
    line = one_stderr_line(result)
    assert line.startswith(f"{domain}: DNS lookup failed ("), line
    assert "policy (id" not in result.stdout
    assert time.monotonic() - started < 10


def test_query_json_dns_server_down(bed: Bed) -> None:
    status, data = query_json(
        bed,
        domain_of("enforce"),
        nameserver=bed.dead_nameserver,
        options=("--dns-timeout", "1"),
    )
    assert status == EXIT_TEMPORARY
    assert data["error"]["type"] == "DNSError"
    assert data["record"] is None
    assert data["policy"] is None


def test_query_several_domains_exits_with_the_worst_status(bed: Bed) -> None:
    result = query(bed, domain_of("enforce"), domain_of("norecord"), domain_of("testing"))
    assert result.returncode == EXIT_NO_POLICY, result
    assert f"{domain_of('enforce')}: enforce policy " in result.stdout
    assert f"{domain_of('testing')}: testing policy " in result.stdout
    assert one_stderr_line(result).startswith(f"{domain_of('norecord')}: no MTA-STS record (")


def test_query_several_domains_dns_down_exits_2(bed: Bed) -> None:
    result = query(
        bed,
        domain_of("enforce"),
        domain_of("norecord"),
        nameserver=bed.dead_nameserver,
        options=("--dns-timeout", "0.5"),
    )
    assert result.returncode == EXIT_TEMPORARY, result


def test_query_json_prints_one_object_per_domain(bed: Bed) -> None:
    result = query(bed, domain_of("enforce"), domain_of("norecord"), options=("--json",))
    assert result.returncode == EXIT_NO_POLICY, result
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["domain"], o["error"] and o["error"]["type"]) for o in objects] == [
        (domain_of("enforce"), None),
        (domain_of("norecord"), "NoRecordError"),
    ]


@pytest.mark.parametrize(
    "arguments", [(), ("--dns-timeout", "soon", "example.org"), ("--no-such-option", "x.org")]
)
def test_query_usage_error_exits_2(bed: Bed, arguments: tuple[str, ...]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "postfix_mtasts", "query", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_TEMPORARY, result
    assert result.stderr.strip()
