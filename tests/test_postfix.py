"""The daemon through Debian's real Postfix: ``postmap -q KEY socketmap:...:NAME``.

``postmap -q`` is Postfix's own socketmap client (``src/util/dict_sockmap.c``), the one the smtp
client uses for ``smtp_tls_policy_maps``: exit 0 and the data for ``OK``, exit 1 and no output for
``NOTFOUND``, ``fatal: ... query error`` for anything Postfix does not accept. Every answer the
daemon gives is put through it, over ``inet:`` and ``unix:``, and compared with what
``postfix-mtasts query --socketmap`` prints for the same key.

postmap reads the main.cf of a configuration directory of our own (``postmap -c DIR``): nothing of
the system's Postfix configuration is used or changed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import idna
import pytest
from bed import SCENARIOS, Bed, Response, Scenario, domain_of, policy_text
from mtasts_daemon import POSTMAP, Lookup, postmap

if TYPE_CHECKING:
    from mtasts_daemon import Daemon

# The session fixture ``daemon`` (tests/daemon.py): imported by pytest itself, before any test.
pytest_plugins = ["mtasts_daemon"]

REPO = Path(__file__).resolve().parent.parent


# An internationalised domain in the zone: bücher.mtasts.test.
IDN_ULABEL = "bücher"
IDN_DOMAIN = domain_of(idna.encode(IDN_ULABEL).decode("ascii"))


def secure(mx: tuple[str, ...] | list[str]) -> str:
    """The data of the daemon's answer for an enforced policy with these mx patterns."""
    patterns = [f".{m[2:]}" if m.startswith("*.") else m for m in mx]
    return f"secure match={':'.join(patterns)} servername=hostname"


def scenario_secure(label: str) -> str:
    return secure(SCENARIOS[label].mx)


def idn_mx() -> tuple[str, ...]:
    return (f"mail.{IDN_DOMAIN}", "*.example.net")


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def idn_domain(bed: Bed) -> str:
    """bücher.mtasts.test (as its A-label) with an enforce policy."""
    record_id = "idn20240101"
    bed.add_domain(
        IDN_DOMAIN,
        Scenario(
            txt=(f"v=STSv1; id={record_id};",),
            response=Response(body=policy_text("enforce", idn_mx())),
        ),
    )
    return IDN_DOMAIN


def query_socketmap(endpoint: str, name: str, *keys: str, stdin: str | None = None) -> Lookup:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "postfix_mtasts",
            "query",
            "--socketmap",
            endpoint,
            "--map",
            name,
            *keys,
        ],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Lookup(result.returncode, result.stdout, result.stderr)


def assert_postmap_answers(
    postfix_dir: Path, daemon: Daemon, key: str, expected: str | None, *, name: str = "postfix"
) -> None:
    """postmap, over inet and unix, gives ``expected`` (None: not found) and nothing else; the
    query tool prints the daemon's raw reply and exits as postmap."""
    for endpoint in (daemon.inet, daemon.unix):
        table = daemon.table(name, endpoint=endpoint)
        found = postmap(postfix_dir, key, table)
        context = f"postmap -q {key!r} {table}: {found}\ndaemon log:\n{daemon.log()}"
        # Postfix accepted the reply: no "fatal: ... query error", no warning about it.
        assert found.stderr == "", context
        if expected is None:
            assert (found.status, found.stdout) == (1, ""), context
        else:
            assert (found.status, found.stdout) == (0, expected + "\n"), context

        raw = "NOTFOUND " if expected is None else f"OK {expected}"
        asked = query_socketmap(endpoint, name, key)
        assert (asked.status, asked.stdout, asked.stderr) == (found.status, raw + "\n", ""), (
            f"postfix-mtasts query --socketmap {endpoint} --map {name} {key!r}: {asked}"
        )


# --------------------------------------------------------------------------------------------------
# Every answer, as postmap sees it.

ENFORCED = ["enforce", "cname", "othertxt"]


@pytest.mark.parametrize("label", ENFORCED)
@pytest.mark.parametrize("name", ["postfix", "strict", "opportunistic", "unknown-map"])
def test_enforce_policy_is_secure_with_the_policy_mx_patterns(
    bed: Bed, daemon: Daemon, postfix_dir: Path, label: str, name: str
) -> None:
    assert_postmap_answers(postfix_dir, daemon, domain_of(label), scenario_secure(label), name=name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("postfix", None),
        ("unknown-map", None),
        ("strict", scenario_secure("testing")),
        ("opportunistic", "may"),
    ],
)
def test_testing_policy_is_answered_as_the_map_profile_says(
    bed: Bed, daemon: Daemon, postfix_dir: Path, name: str, expected: str | None
) -> None:
    assert_postmap_answers(postfix_dir, daemon, domain_of("testing"), expected, name=name)


@pytest.mark.parametrize("name", ["postfix", "strict", "opportunistic"])
def test_none_policy_is_notfound_in_every_profile(
    bed: Bed, daemon: Daemon, postfix_dir: Path, name: str
) -> None:
    assert_postmap_answers(postfix_dir, daemon, domain_of("none"), None, name=name)


NO_RECORD = ["norecord", "tworecords", "badrecord", "noid", "nosemicolon"]


@pytest.mark.parametrize("label", NO_RECORD)
def test_domain_without_a_usable_record_is_notfound(
    bed: Bed, daemon: Daemon, postfix_dir: Path, label: str
) -> None:
    assert_postmap_answers(postfix_dir, daemon, domain_of(label), None, name="strict")


FETCH_FAILURES = [
    "notfound404",
    "error500",
    "redirect",
    "wrongtype",
    "oversized",
    "wrongname",
    "expired",
    "untrusted",
    "badpolicy",
    "nohost",
    "hang",
]


@pytest.mark.parametrize("label", FETCH_FAILURES)
def test_policy_fetch_failure_is_notfound(
    bed: Bed, daemon: Daemon, postfix_dir: Path, label: str
) -> None:
    assert_postmap_answers(postfix_dir, daemon, domain_of(label), None, name="strict")


@pytest.mark.parametrize(
    "key",
    [
        "EnForce.MTASTS.Test",
        "ENFORCE.MTASTS.TEST",
        "enforce.mtasts.test.",
        "enforce.mtasts.test:25",
        "Enforce.Mtasts.Test:587",
    ],
)
def test_mixed_case_trailing_dot_and_port_keys_are_the_domain(
    bed: Bed, daemon: Daemon, postfix_dir: Path, key: str
) -> None:
    assert_postmap_answers(postfix_dir, daemon, key, scenario_secure("enforce"))


@pytest.mark.parametrize(
    "key",
    [
        IDN_DOMAIN,
        f"{IDN_ULABEL}.mtasts.test",
        f"{IDN_ULABEL.upper()}.MTASTS.TEST",
        f"{IDN_ULABEL}.mtasts.test:25",
    ],
)
def test_idn_keys_are_looked_up_as_their_a_label(
    daemon: Daemon, postfix_dir: Path, idn_domain: str, key: str
) -> None:
    assert_postmap_answers(postfix_dir, daemon, key, secure(idn_mx()))


NO_POLICY_KEYS = [
    ".enforce.mtasts.test",
    ".mtasts.test",
    ".test",
    "[enforce.mtasts.test]",
    "[mail.enforce.mtasts.test]",
    "[enforce.mtasts.test]:25",
    "[mail.enforce.mtasts.test]:587",
    "[127.0.0.1]",
    "[127.0.0.1]:25",
    "127.0.0.1",
    "[::1]:25",
    "enforce",
]


@pytest.mark.parametrize("key", NO_POLICY_KEYS)
def test_parent_probes_literal_next_hops_and_addresses_are_notfound(
    bed: Bed, daemon: Daemon, postfix_dir: Path, key: str
) -> None:
    assert_postmap_answers(postfix_dir, daemon, key, None, name="strict")


def test_keys_without_a_policy_domain_cost_no_lookup(
    bed: Bed, daemon: Daemon, postfix_dir: Path
) -> None:
    """``.parent``, ``[host]`` and ``[host]:port`` never reach the policy host; the domain itself
    does, once, and its other spellings are answered from the same cache entry."""
    domain = bed.unique_domain("nolookup")
    mx = (f"mail.{domain}",)
    bed.add_domain(
        domain,
        Scenario(
            txt=("v=STSv1; id=nolookup1;",), response=Response(body=policy_text("enforce", mx))
        ),
    )
    policy_host = f"mta-sts.{domain}"
    for key in (f".{domain}", f"[{domain}]", f"[{domain}]:25", f"[mail.{domain}]:587"):
        assert_postmap_answers(postfix_dir, daemon, key, None)
    assert bed.https.request_count(policy_host) == 0

    assert_postmap_answers(postfix_dir, daemon, f"{domain}:25", secure(mx))
    assert bed.https.request_count(policy_host) == 1
    assert_postmap_answers(postfix_dir, daemon, domain.upper(), secure(mx))
    assert_postmap_answers(postfix_dir, daemon, f"{domain}.", secure(mx))
    assert bed.https.request_count(policy_host) == 1


# --------------------------------------------------------------------------------------------------
# Many keys on one connection, as an smtp process asks.


@pytest.fixture(scope="module")
def many_keys(idn_domain: str) -> dict[str, str | None]:
    """Keys and the data postmap must find for them (None: not found), under ``strict``."""
    return {
        domain_of("enforce"): scenario_secure("enforce"),
        domain_of("testing"): scenario_secure("testing"),
        domain_of("none"): None,
        domain_of("norecord"): None,
        domain_of("error500"): None,
        "[enforce.mtasts.test]:25": None,
        ".enforce.mtasts.test": None,
        "EnForce.MTASTS.Test": scenario_secure("enforce"),
        f"{IDN_ULABEL}.mtasts.test": secure(idn_mx()),
    }


def test_postmap_reads_many_keys_over_one_connection(
    bed: Bed, daemon: Daemon, postfix_dir: Path, many_keys: dict[str, str | None]
) -> None:
    """``postmap -q -`` sends every key of its input on one connection, one request at a time,
    like an smtp process; it prints ``key<TAB>data`` for the keys found."""
    for endpoint in (daemon.inet, daemon.unix):
        table = daemon.table("strict", endpoint=endpoint)
        result = subprocess.run(
            [POSTMAP, "-c", str(postfix_dir), "-q", "-", table],
            input="".join(f"{key}\n" for key in many_keys),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        expected = "".join(f"{key}\t{data}\n" for key, data in many_keys.items() if data)
        assert (result.returncode, result.stdout, result.stderr) == (0, expected, ""), (
            f"postmap -q - {table}: {result}\ndaemon log:\n{daemon.log()}"
        )

        asked = query_socketmap(endpoint, "strict", stdin="".join(f"{k}\n" for k in many_keys))
        replies = "".join(f"OK {data}\n" if data else "NOTFOUND \n" for data in many_keys.values())
        assert (asked.status, asked.stdout, asked.stderr) == (0, replies, ""), asked
