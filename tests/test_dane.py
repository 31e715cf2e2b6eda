"""DANE precedence (RFC 7672, RFC 8461 §2) against the DNSSEC test bed, and TLSRPT attributes.

Every domain of bed.DANE_SCENARIOS is evaluated three ways, each against the real signed zone and
validating resolver of the bed (knot signs, unbound validates, the AD bit decides):

- ``dane.evaluate`` directly: the verdict and the state of every MX host;
- the daemon with ``[dane] enabled``, through Postfix's own socketmap client (``postmap -q``):
  ``dane-only``, ``dane``, the MTA-STS answer where DANE does not apply, ``NOTFOUND`` for a null
  MX, and a temporary error (mail deferred) where a lookup failed;
- ``postfix-mtasts query``, which shows the reasoning host by host.

Plus the resolver's side (``secure_query``, ``validates``), the daemon's start-up check of its
resolver, and the TLSRPT attributes an opted-in socketmap name adds to MTA-STS answers.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from bed import (
    DANE_SCENARIOS,
    DANE_ZONE,
    DOWN_ZONE,
    EE,
    SCENARIOS,
    UNUSABLE,
    USABLE_EE,
    ZONE,
    Bed,
    DaneScenario,
    Response,
    Scenario,
    domain_of,
    policy_text,
)
from mtasts_daemon import DANE_EXTRA, postmap, running_daemon

from postfix_mtasts import dane
from postfix_mtasts.dane import DaneCache
from postfix_mtasts.resolver import DNSTemporaryError, Resolver

if TYPE_CHECKING:
    from mtasts_daemon import Daemon

# The session fixture ``dane_daemon`` (tests/mtasts_daemon.py).
pytest_plugins = ["mtasts_daemon"]

REPO = Path(__file__).resolve().parent.parent

DNS_TIMEOUT = 2.0
# A lookup in the zone whose server is down fails within unbound's retransmit limit; anything
# near the resolver's lifetime means the failure was taken for something else and waited out.
TEMP_WITHIN = 2.0

LABELS = list(DANE_SCENARIOS)


def secure_answer(mx: tuple[str, ...] | list[str]) -> str:
    """The data of the daemon's answer for an enforced policy with these mx patterns."""
    patterns = [f".{m[2:]}" if m.startswith("*.") else m for m in mx]
    return f"secure match={':'.join(patterns)} servername=hostname"


def expected_answer(scenario: DaneScenario) -> str | None:
    """What postmap prints for the domain (None: not found); TEMP is handled separately."""
    if scenario.state in ("dane-only", "dane"):
        return scenario.state
    if scenario.state == "none" and scenario.policy_mx:
        return secure_answer(scenario.policy_mx)
    return None


@pytest.fixture(scope="module")
def validating(bed: Bed) -> Resolver:
    return Resolver(bed.validating_nameservers, timeout=DNS_TIMEOUT)


@pytest.fixture(scope="module")
def plain(bed: Bed) -> Resolver:
    return Resolver(bed.resolver_nameservers, timeout=DNS_TIMEOUT)


# --------------------------------------------------------------------------------------------------
# dane.evaluate, scenario by scenario.


@pytest.mark.parametrize("label", LABELS)
def test_evaluate_gives_the_scenario_verdict_and_host_states(
    bed: Bed, validating: Resolver, label: str
) -> None:
    scenario = DANE_SCENARIOS[label]
    started = time.monotonic()
    verdict = dane.evaluate(scenario.domain, validating)
    elapsed = time.monotonic() - started
    found = [(host.host, host.state) for host in verdict.hosts]
    context = f"{scenario.domain}: {verdict}"
    assert verdict.domain == scenario.domain, context
    assert verdict.state == scenario.state, context
    # In MX preference order, every host once.
    assert found == list(scenario.hosts), context
    assert verdict.reason, context
    assert all(host.detail for host in verdict.hosts), context
    assert elapsed < TEMP_WITHIN, f"{context} took {elapsed:.1f}s"
    if verdict.state is dane.DaneState.TEMP:
        # The reason names the failed lookup, so a postmaster can see what to fix.
        assert DOWN_ZONE in verdict.reason and "SERVFAIL" in verdict.reason, context
    else:
        assert dane.MIN_TTL <= verdict.ttl <= dane.MAX_TTL, context


def test_a_tlsa_digest_of_the_wrong_length_makes_the_host_unusable_not_temp(
    bed: Bed, validating: Resolver
) -> None:
    """A SHA2-256 digest that is not 32 bytes long (RFC 6698 §2.1.3) is a malformed, unusable
    record. It is legal on the wire, and a domain that publishes one must not be deferred for ever
    as if its DNS were down. (dnspython refuses to parse such a reply: see test_dnssec_bed.py.)"""
    host = f"short.unusable-tlsa.{DANE_ZONE}"
    domain = bed.unique_dane_domain("short")
    bed.dns_set(domain, "MX", [f"10 {host}."])
    verdict = dane.evaluate(domain, validating)
    assert verdict.state is dane.DaneState.DANE, verdict
    assert [(h.host, h.state) for h in verdict.hosts] == [(host, "unusable")], verdict


def test_dane_verdict_follows_the_records_of_a_new_domain(bed: Bed, validating: Resolver) -> None:
    """Records published at run time (signed by knot on the fly) are what evaluate sees."""
    domain = bed.unique_dane_domain("live")
    host = f"mx.{domain}"
    bed.dns_set(domain, "MX", [f"10 {host}."])
    bed.dns_set(host, "A", ["127.0.0.1"])
    assert dane.evaluate(domain, validating).state is dane.DaneState.NONE
    bed.dns_set(f"_25._tcp.{host}", "TLSA", [bed.expand(USABLE_EE)])
    assert dane.evaluate(domain, validating).state is dane.DaneState.DANE_ONLY
    bed.dns_set(f"_25._tcp.{host}", "TLSA", [bed.expand(UNUSABLE["usage1"])])
    assert dane.evaluate(domain, validating).state is dane.DaneState.DANE


def test_without_a_validating_resolver_nothing_is_dane(bed: Bed, plain: Resolver) -> None:
    """The same signed records through a resolver that does not validate: no AD bit, so no DANE
    (the MTA-STS answer decides); never a TEMP for a domain that resolves."""
    for label in ("all-tlsa", "some-tlsa", "unusable-tlsa", "implicit-mx", "dane-mtasts"):
        verdict = dane.evaluate(DANE_SCENARIOS[label].domain, plain)
        assert verdict.state is dane.DaneState.NONE, verdict


# --------------------------------------------------------------------------------------------------
# The resolver's DNSSEC side.


def test_validates_is_true_only_for_a_validating_resolver(
    bed: Bed, validating: Resolver, plain: Resolver
) -> None:
    assert validating.validates(DANE_ZONE)
    assert validating.validates(f"mx1.all-tlsa.{DANE_ZONE}")
    assert not plain.validates(DANE_ZONE)
    # An unsigned name gets no AD bit from any resolver.
    assert not validating.validates(ZONE)
    # A resolver that does not answer does not validate either (and says so quickly).
    dead = Resolver([bed.dead_nameserver], timeout=0.2, lifetime=0.5)
    assert not dead.validates(DANE_ZONE)


def test_secure_query_reports_answers_denials_and_the_ad_bit(
    bed: Bed, validating: Resolver, plain: Resolver
) -> None:
    mx = validating.secure_query(f"all-tlsa.{DANE_ZONE}", "MX")
    assert (mx.exists, mx.secure, mx.nxdomain) == (True, True, False)
    assert sorted(r.exchange.to_text() for r in mx.records) == [
        f"mx1.all-tlsa.{DANE_ZONE}.",
        f"mx2.all-tlsa.{DANE_ZONE}.",
    ]
    tlsa = validating.secure_query(f"_25._tcp.mx1.all-tlsa.{DANE_ZONE}", "TLSA")
    assert tlsa.secure and [bytes(r.cert).hex() for r in tlsa.records] == [bed.expand(EE)]
    nodata = validating.secure_query(f"implicit-mx.{DANE_ZONE}", "MX")
    assert (nodata.exists, nodata.secure, nodata.nxdomain, nodata.records) == (
        False,
        True,
        False,
        (),
    )
    nxdomain = validating.secure_query(f"nxdomain.{DANE_ZONE}", "MX")
    assert (nxdomain.exists, nxdomain.secure, nxdomain.nxdomain) == (False, True, True)
    unsigned = validating.secure_query(DANE_SCENARIOS["unsigned-mx"].domain, "MX")
    assert (unsigned.exists, unsigned.secure) == (True, False)
    not_validated = plain.secure_query(f"all-tlsa.{DANE_ZONE}", "MX")
    assert (not_validated.exists, not_validated.secure) == (True, False)
    # Through a CNAME, to the MX RRset of its target.
    cname = validating.secure_query(f"cname-mx.{DANE_ZONE}", "MX")
    assert cname.secure and len(cname.records) == 2


def test_secure_query_in_the_zone_whose_server_is_down_is_a_temporary_error(
    validating: Resolver,
) -> None:
    started = time.monotonic()
    with pytest.raises(DNSTemporaryError) as raised:
        validating.secure_query(f"mx.{DOWN_ZONE}", "A")
    assert time.monotonic() - started < TEMP_WITHIN
    message = str(raised.value)
    assert message.startswith(f"mx.{DOWN_ZONE} A: SERVFAIL"), message


# --------------------------------------------------------------------------------------------------
# The daemon, through postmap.


def assert_postmap_finds(
    postfix_dir: Path, daemon: Daemon, key: str, expected: str | None, name: str = "postfix"
) -> None:
    """postmap over inet and unix finds ``expected`` (None: not found) and complains of nothing."""
    for endpoint in (daemon.inet, daemon.unix):
        table = daemon.table(name, endpoint=endpoint)
        found = postmap(postfix_dir, key, table)
        context = f"postmap -q {key!r} {table}: {found}\ndaemon log:\n{daemon.log()}"
        assert found.stderr == "", context
        if expected is None:
            assert (found.status, found.stdout) == (1, ""), context
        else:
            assert (found.status, found.stdout) == (0, expected + "\n"), context


@pytest.mark.parametrize("label", LABELS)
def test_daemon_answers_postfix_as_the_dane_verdict_says(
    bed: Bed, dane_daemon: Daemon, postfix_dir: Path, label: str
) -> None:
    scenario = DANE_SCENARIOS[label]
    if scenario.state == "temp":
        # Postfix's socketmap client turns TEMP into a query error: the mail is deferred.
        for endpoint in (dane_daemon.inet, dane_daemon.unix):
            table = dane_daemon.table(endpoint=endpoint)
            found = postmap(postfix_dir, scenario.domain, table)
            context = f"postmap -q {scenario.domain} {table}: {found}\n{dane_daemon.log()}"
            assert found.status == 1 and found.stdout == "", context
            assert "temporary error" in found.stderr and "fatal:" in found.stderr, context
            assert "query error" in found.stderr, context
        reply = dane_daemon.request(scenario.domain)
        assert reply.startswith("TEMP ") and scenario.domain in reply, reply
        return
    assert_postmap_finds(postfix_dir, dane_daemon, scenario.domain, expected_answer(scenario))


@pytest.mark.parametrize("name", ["strict", "opportunistic", "tlsrpt", "unknown-map"])
@pytest.mark.parametrize("label", ["all-tlsa", "some-tlsa", "dane-mtasts"])
def test_dane_answers_are_the_same_in_every_profile(
    dane_daemon: Daemon, postfix_dir: Path, label: str, name: str
) -> None:
    """DANE answers carry no profile-dependent parts (and no TLSRPT attributes: Postfix reports
    DANE itself)."""
    scenario = DANE_SCENARIOS[label]
    assert_postmap_finds(postfix_dir, dane_daemon, scenario.domain, scenario.state, name)


@pytest.mark.parametrize(
    "key",
    [
        "ALL-TLSA.Dane.Test",
        f"all-tlsa.{DANE_ZONE}.",
        f"all-tlsa.{DANE_ZONE}:25",
    ],
)
def test_dane_keys_are_normalised_like_mtasts_keys(
    dane_daemon: Daemon, postfix_dir: Path, key: str
) -> None:
    assert_postmap_finds(postfix_dir, dane_daemon, key, "dane-only")


@pytest.mark.parametrize("key", [f".all-tlsa.{DANE_ZONE}", f"[mx1.all-tlsa.{DANE_ZONE}]:25"])
def test_parent_probes_and_literal_next_hops_are_not_dane_domains(
    dane_daemon: Daemon, postfix_dir: Path, key: str
) -> None:
    assert_postmap_finds(postfix_dir, dane_daemon, key, None)


def test_mtasts_domains_keep_their_answers_with_dane_enabled(
    dane_daemon: Daemon, postfix_dir: Path
) -> None:
    """Unsigned domains: DANE does not apply, the MTA-STS answers are those of the plain daemon."""
    assert_postmap_finds(
        postfix_dir, dane_daemon, domain_of("enforce"), secure_answer(SCENARIOS["enforce"].mx)
    )
    assert_postmap_finds(postfix_dir, dane_daemon, domain_of("testing"), None)
    assert_postmap_finds(
        postfix_dir,
        dane_daemon,
        domain_of("testing"),
        secure_answer(SCENARIOS["testing"].mx),
        "strict",
    )
    assert_postmap_finds(postfix_dir, dane_daemon, domain_of("norecord"), None)


# --------------------------------------------------------------------------------------------------
# TLSRPT attributes (Postfix 3.10 TLSRPT_README), opted in per socketmap name.


def tlsrpt_answer(domain: str, mx: tuple[str, ...], policy: bytes) -> str:
    lines = [line for line in policy.decode().split("\n") if line]
    return (
        secure_answer(mx)
        + f" policy_type=sts policy_domain={domain}"
        + "".join(f" mx_host_pattern={m}" for m in mx)
        + "".join(f" {{ policy_string = {line} }}" for line in lines)
    )


def test_tlsrpt_profile_adds_the_policy_attributes_to_mtasts_answers(
    dane_daemon: Daemon, postfix_dir: Path
) -> None:
    """Postfix 3.7 would reject these attributes in a delivery, but postmap only prints the
    value: it shows the daemon passes the whole answer through in one piece."""
    for label in ("enforce", "cname"):
        domain = domain_of(label)
        scenario = SCENARIOS[label]
        expected = tlsrpt_answer(domain, scenario.mx, policy_text("enforce", scenario.mx))
        assert_postmap_finds(postfix_dir, dane_daemon, domain, expected, "tlsrpt")
        # Only the opted-in name: the others answer as before.
        assert_postmap_finds(postfix_dir, dane_daemon, domain, secure_answer(scenario.mx))
    # The MTA-STS answer of a signed domain without TLSA carries them too.
    no_tlsa = DANE_SCENARIOS["no-tlsa"]
    expected = tlsrpt_answer(no_tlsa.domain, no_tlsa.policy_mx, no_tlsa.policy)
    assert_postmap_finds(postfix_dir, dane_daemon, no_tlsa.domain, expected, "tlsrpt")


def test_tlsrpt_profile_keeps_wildcards_and_leaves_out_lines_with_braces(
    bed: Bed, dane_daemon: Daemon, postfix_dir: Path
) -> None:
    domain = bed.unique_domain("tlsrpt")
    mx = (f"mail.{domain}", "*.example.net")
    body = policy_text("enforce", mx) + b"x-note: {braced}\nx-ext: value\n"
    bed.add_domain(domain, Scenario(txt=("v=STSv1; id=tlsrpt1;",), response=Response(body=body)))
    lines = [line for line in body.decode().split("\n") if line and "{" not in line]
    expected = (
        secure_answer(mx)
        + f" policy_type=sts policy_domain={domain}"
        + f" mx_host_pattern=mail.{domain} mx_host_pattern=*.example.net"
        + "".join(f" {{ policy_string = {line} }}" for line in lines)
    )
    assert "match=mail." in expected and ".example.net servername" in expected
    assert_postmap_finds(postfix_dir, dane_daemon, domain, expected, "tlsrpt")


def test_testing_policy_under_tlsrpt_profile_is_still_notfound(
    dane_daemon: Daemon, postfix_dir: Path
) -> None:
    assert_postmap_finds(postfix_dir, dane_daemon, domain_of("testing"), None, "tlsrpt")


# --------------------------------------------------------------------------------------------------
# postfix-mtasts query: the DANE reasoning.


def run_query(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postfix_mtasts", "query", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("label", LABELS)
def test_query_shows_the_dane_verdict_host_by_host(
    bed: Bed, dane_daemon: Daemon, label: str
) -> None:
    scenario = DANE_SCENARIOS[label]
    result = run_query("-c", str(dane_daemon.config_path), scenario.domain)
    context = f"postfix-mtasts query {scenario.domain}:\n{result.stdout}{result.stderr}"
    lines = result.stdout.splitlines()
    assert lines and lines[0].startswith(f"{scenario.domain}: DANE {scenario.state} ("), context
    for host, state in scenario.hosts:
        assert any(line.startswith(f"  {host}: {state}") for line in lines), context
    answer = [line for line in lines if line.startswith("  postfix answer: ")]
    if scenario.state == "temp":
        assert result.returncode == 2, context
        assert answer and answer[0].startswith("  postfix answer: TEMP "), context
        return
    expected = expected_answer(scenario)
    assert answer == [f"  postfix answer: {'NOTFOUND ' if expected is None else 'OK ' + expected}"]
    assert result.returncode == (1 if expected is None else 0), context


def test_query_json_carries_the_dane_verdict(bed: Bed, dane_daemon: Daemon) -> None:
    some = DANE_SCENARIOS["some-tlsa"]
    result = run_query("-c", str(dane_daemon.config_path), "--json", some.domain)
    assert result.returncode == 0, result
    (report,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert report["postfix_answer"] == "OK dane"
    assert report["dane"]["state"] == "dane"
    assert [(h["host"], h["state"]) for h in report["dane"]["hosts"]] == list(some.hosts)


def test_query_without_dane_ignores_tlsa_records(bed: Bed, dane_daemon: Daemon) -> None:
    """``--no-dane`` answers as a daemon without DANE: the MTA-STS policy of dane-mtasts."""
    scenario = DANE_SCENARIOS["dane-mtasts"]
    result = run_query("-c", str(dane_daemon.config_path), "--no-dane", scenario.domain)
    assert result.returncode == 0, result
    assert "DANE" not in result.stdout
    assert f"  postfix answer: OK {secure_answer(scenario.policy_mx)}" in result.stdout


def test_query_with_dane_option_and_validating_nameserver(bed: Bed) -> None:
    """``--dane`` and ``--nameserver`` without a configuration file."""
    scenario = DANE_SCENARIOS["all-tlsa"]
    result = run_query(
        "--dane",
        "--nameserver",
        bed.validating_nameservers[0],
        "--ca-file",
        bed.ca_file,
        "--allow-private-addresses",
        "--dns-timeout",
        str(DNS_TIMEOUT),
        scenario.domain,
    )
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[0].startswith(f"{scenario.domain}: DANE dane-only")
    assert "  postfix answer: OK dane-only" in result.stdout


# --------------------------------------------------------------------------------------------------
# The start-up check of the resolver.


def wait_for_log(daemon: Daemon, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.log_path.read_text(errors="replace")
        if text in log:
            return log
        time.sleep(0.05)
    pytest.fail(f"no {text!r} in the daemon's log within {timeout:.0f}s:\n{daemon.log()}")


def test_daemon_warns_when_dane_is_enabled_but_the_resolver_does_not_validate(
    bed: Bed, tmp_path: Path
) -> None:
    with running_daemon(bed, tmp_path, extra=DANE_EXTRA) as daemon:
        log = wait_for_log(daemon, "does not validate DNSSEC")
        (line,) = [line for line in log.splitlines() if "does not validate DNSSEC" in line]
        assert "WARNING" in line
        # It names the resolver and the signed name it tried.
        host, port = bed.resolver_nameservers[0].rsplit(":", 1)
        assert f"{host} port {port}" in line and f"no AD bit for {DANE_ZONE}" in line, line
        # It still answers; with no AD bit, a signed domain gets its MTA-STS answer.
        assert daemon.request(DANE_SCENARIOS["dane-mtasts"].domain) == (
            f"OK {secure_answer(DANE_SCENARIOS['dane-mtasts'].policy_mx)}"
        )


def test_daemon_with_a_validating_resolver_does_not_warn(dane_daemon: Daemon) -> None:
    log = wait_for_log(dane_daemon, "resolver validates DNSSEC")
    assert "does not validate" not in log
    assert f"AD bit set for {DANE_ZONE}" in log


# --------------------------------------------------------------------------------------------------
# The verdict cache is bounded: a client asking for made-up names does not grow it without end.


def test_dane_verdicts_held_are_bounded(bed: Bed, validating: Resolver) -> None:
    names = [bed.unique_dane_domain("noverdict") for _ in range(25)]

    async def scenario() -> None:
        cache = DaneCache(validating, max_verdicts=10)
        try:
            for name in names:
                answer = cache.lookup(name)
                if isinstance(answer, asyncio.Future):
                    await answer
                assert cache.size <= 10
            # The newest verdict is among those kept: answered at once.
            assert isinstance(cache.lookup(names[-1]), dane.DaneResult)
        finally:
            cache.close()

    asyncio.run(scenario())
