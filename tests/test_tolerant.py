"""Policies as domains publish them: the tolerant reading, the ``[policy] parsing`` setting, and
the corpus of real published policies in tests/corpus (docs/policy-parsing.md).

Strings in, values out for the parser; the real daemon and the real ``query`` command against the
test bed for what a postmaster sees.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import querycli
from bed import Bed
from mtasts_daemon import Daemon, running_daemon

from postfix_mtasts import cache_rules, config
from postfix_mtasts.config import CacheConfig
from postfix_mtasts.mtasts import (
    DEFECTS,
    MX,
    Mode,
    Policy,
    PolicySyntaxError,
    Record,
    parse_policy,
    printable_defects,
)
from postfix_mtasts.store import Entry
from postfix_mtasts.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "corpus"
DOC = REPO / "docs" / "policy-parsing.md"

CLEAN = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 86400\n"
CLEAN_POLICY = Policy(
    version="STSv1",
    mode=Mode.ENFORCE,
    mx=(MX(False, "mail.example.com"), MX(True, "example.net")),
    max_age=86400,
)


# --------------------------------------------------------------------------------------------------
# Every tolerated defect: strict refuses it, tolerant gives the clean policy and names the defect.

TOLERATED = [
    pytest.param("\ufeff" + CLEAN, ("byte-order mark",), id="bom"),
    pytest.param(CLEAN.replace("\n", "\r"), ("CR line end",), id="cr-only"),
    pytest.param(CLEAN.replace("\n", "\r\r\n"), ("CR line end", "blank line"), id="cr-cr-lf"),
    pytest.param(CLEAN + "\n", ("blank line",), id="trailing-blank-line"),
    pytest.param(CLEAN + "\r\n\r\n\n", ("blank line",), id="trailing-blank-lines"),
    pytest.param("\n" + CLEAN, ("blank line",), id="leading-blank-line"),
    pytest.param(CLEAN.replace("mode", "\nmode"), ("blank line",), id="inner-blank-line"),
    pytest.param(CLEAN + "   \t\n", ("blank line",), id="whitespace-only-line"),
    pytest.param(
        "".join("  " + line + "\n" for line in CLEAN.splitlines()),
        ("indented line",),
        id="indented",
    ),
    pytest.param(CLEAN.replace("max_age", "\tmax_age"), ("indented line",), id="tab-indented"),
    pytest.param(
        CLEAN.replace("mail.example.com", "mail.example.com."),
        ("mx with trailing dot",),
        id="mx-trailing-dot",
    ),
    pytest.param(
        CLEAN.replace("*.example.net", "*.example.net."),
        ("mx with trailing dot",),
        id="wildcard-mx-trailing-dot",
    ),
    pytest.param(
        CLEAN.replace("max_age", "mx: 192.0.2.25\nmax_age"),
        ("mx is an IP address, dropped: 192.0.2.25",),
        id="mx-ipv4",
    ),
    pytest.param(
        CLEAN.replace("max_age", "mx: [2001:db8::25]\nmx: 2001:db8::26\nmax_age"),
        ("mx is an IP address, dropped: [2001:db8::25] 2001:db8::26",),
        id="mx-ipv6",
    ),
    pytest.param(
        "\ufeff  version: STSv1\r\n\r\n  mode: enforce\rmx: mail.example.com.\n"
        "mx: *.example.net\r\nmx: 192.0.2.1\nmax_age: 86400\n\n\n",
        (
            "byte-order mark",
            "CR line end",
            "indented line",
            "blank line",
            "mx with trailing dot",
            "mx is an IP address, dropped: 192.0.2.1",
        ),
        id="all-at-once",
    ),
]


@pytest.mark.parametrize(("text", "defects"), TOLERATED)
def test_tolerant_reading_accepts_a_defect_that_strict_refuses(
    text: str, defects: tuple[str, ...]
) -> None:
    with pytest.raises(PolicySyntaxError):
        parse_policy(text, "example.com")
    policy = parse_policy(text, "example.com", tolerant=True)
    assert policy == CLEAN_POLICY
    assert set(policy.defects) == set(defects)
    assert len(policy.defects) == len(set(policy.defects))
    assert parse_policy(text.encode("utf-8"), "example.com", tolerant=True) == CLEAN_POLICY


def test_a_clean_policy_has_no_defects_in_either_reading() -> None:
    for tolerant in (False, True):
        policy = parse_policy(CLEAN, "example.com", tolerant=tolerant)
        assert policy == CLEAN_POLICY
        assert policy.defects == ()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(CLEAN.replace("\n", "\r\n", 2), id="mixed-lf-crlf"),
        pytest.param(CLEAN.replace("\n", " \t\n"), id="trailing-whitespace"),
        pytest.param(CLEAN.rstrip("\n"), id="no-final-line-end"),
    ],
)
def test_what_the_rfc_grammar_allows_is_no_defect(text: str) -> None:
    # RFC 8461 §3.2: LF or CRLF per line, *WSP after a value, the last terminator optional.
    assert parse_policy(text, "example.com") == CLEAN_POLICY
    assert parse_policy(text, "example.com", tolerant=True).defects == ()


# --------------------------------------------------------------------------------------------------
# What changes meaning stays invalid, alone and together with tolerated defects.

BASE_NO_MODE = "version: STSv1\nmx: mail.example.com\nmax_age: 86400\n"
REFUSED = [
    pytest.param(CLEAN.replace("enforce", "enforced"), "mode 'enforced'", id="misspelt-mode"),
    pytest.param(CLEAN.replace("enforce", "Enforce"), "mode 'Enforce'", id="mode-case"),
    pytest.param(CLEAN.replace("enforce", "[testing]"), "mode '[testing]'", id="mode-bracket"),
    pytest.param(BASE_NO_MODE, 'no "mode"', id="no-mode"),
    pytest.param(CLEAN.replace("86400", "86400s"), "max_age '86400s'", id="max-age-unit"),
    pytest.param(CLEAN.replace("86400", "-1"), "max_age '-1'", id="max-age-negative"),
    pytest.param(CLEAN.replace("max_age: 86400\n", ""), 'no "max_age"', id="no-max-age"),
    pytest.param(CLEAN.replace("STSv1", "STSv2"), "version 'STSv2'", id="unknown-version"),
    pytest.param(CLEAN.replace("STSv1", "STLS1"), "version 'STLS1'", id="misspelt-version"),
    pytest.param("version: STSv1\nmode: enforce\nmax_age: 86400\n", 'no "mx" field', id="no-mx"),
    pytest.param(
        "version: STSv1\nmode: testing\nmx: 192.0.2.1\nmx: [::1]\nmax_age: 86400\n",
        "only IP addresses",
        id="only-ip-mx",
    ),
    pytest.param(CLEAN.replace("mail.example.com", "://google.com"), "mx", id="mx-url"),
    pytest.param(CLEAN.replace("mail.example.com", "mail.example.com.."), "mx", id="mx-two-dots"),
    pytest.param(CLEAN.replace("mail.example.com", "mail_server"), "mx", id="mx-underscore"),
    pytest.param(CLEAN.replace("mail.example.com", "192.0.2.1."), "mx", id="mx-ip-with-dot"),
    pytest.param(CLEAN.replace("mail.example.com", "*."), "mx", id="mx-bare-wildcard"),
    pytest.param("Our policy\n\nNo MTA-STS here.\n", 'not "key: value"', id="prose"),
    pytest.param("\n\n \r\n", "only blank lines", id="blank-only"),
    pytest.param(
        CLEAN.replace("max_age: 86400\n", "max_age: 86400version: STSv1\n"),
        "max_age",
        id="pasted-twice",
    ),
    pytest.param(CLEAN.replace("mode", "mo de"), "invalid key", id="key-with-space"),
    pytest.param(CLEAN.replace("enforce", "enf\x00orce"), "invalid value", id="nul-in-value"),
]


@pytest.mark.parametrize(("text", "cause"), REFUSED)
@pytest.mark.parametrize("decoration", ["none", "bom-and-blank-lines"])
def test_both_readings_refuse_what_changes_meaning(text: str, cause: str, decoration: str) -> None:
    if decoration != "none":
        text = "\ufeff\n" + text + "\n\n"
    for tolerant in (False, True):
        with pytest.raises(PolicySyntaxError) as caught:
            parse_policy(text, "example.com", tolerant=tolerant)
        assert caught.value.domain == "example.com"
        if tolerant:
            # The strict reading may stop earlier, at the decoration or the address.
            assert cause in caught.value.cause


def test_a_none_policy_may_be_left_without_mx_after_dropping_addresses() -> None:
    text = "version: STSv1\nmode: none\nmx: 192.0.2.1\nmax_age: 86400\n"
    policy = parse_policy(text, "example.com", tolerant=True)
    assert policy.mode is Mode.NONE and policy.mx == ()
    assert policy.defects == ("mx is an IP address, dropped: 192.0.2.1",)


def test_strict_reading_is_unchanged_for_a_trailing_dot_and_an_address() -> None:
    for mx in ("mail.example.com.", "192.0.2.1"):
        with pytest.raises(PolicySyntaxError, match="not a host name"):
            parse_policy(CLEAN.replace("mail.example.com", mx), "example.com")


def test_printable_defects_escapes_control_characters_and_is_bounded() -> None:
    text = printable_defects(("mx is an IP address, dropped: fe80::1%e\x1b[31m\u202e",) * 20)
    assert len(text) <= 200
    assert text.endswith("...")
    assert all(" " <= ch <= "~" for ch in text)
    assert "\\x1b" in text


def test_defects_named_in_the_docs_are_the_parsers() -> None:
    page = DOC.read_text(encoding="utf-8")
    for defect in DEFECTS:
        assert f"| `{defect}" in page


# --------------------------------------------------------------------------------------------------
# [policy] parsing.


def test_parsing_is_tolerant_by_default_and_may_be_strict() -> None:
    assert config.loads("", daemon_files=False).parsing == "tolerant"
    strict = config.loads('[policy]\nparsing = "strict"\n', daemon_files=False)
    assert strict.parsing == "strict"
    assert config.loads(config.dump(strict), daemon_files=False) == strict
    assert 'parsing = "strict"' in config.dump(strict).split("[policy]")[1].split("[")[0]


def test_parsing_refuses_other_values_naming_file_and_key() -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.loads('[policy]\nparsing = "lenient"\n', "my.toml", daemon_files=False)
    message = str(caught.value)
    assert "my.toml" in message and "policy.parsing" in message and "lenient" in message


def test_parsing_is_not_a_per_map_key() -> None:
    # One fetch serves every map: the reading cannot differ per map.
    with pytest.raises(config.ConfigError, match=r"maps\.x\.parsing"):
        config.loads('[maps.x]\nparsing = "strict"\n', "my.toml", daemon_files=False)


# --------------------------------------------------------------------------------------------------
# The cache: what was fetched is what is read back; the defects are logged once per fetch.

DOMAIN = "example.com"
DEFECTIVE = "\ufeffversion: STSv1\nmode: enforce\nmx: mail.example.com.\nmax_age: 86400\n\n"


def _stored(text: str, now: float) -> Entry:
    return Entry(
        domain=DOMAIN,
        record_id="1",
        policy_text=text,
        fetched_at=now - 10,
        expires_at=now + 86400,
        checked_at=now - 10,
        last_used=now - 10,
    )


def test_a_stored_tolerant_policy_reads_back_as_fetched() -> None:
    now = time.time()
    fetched = parse_policy(DEFECTIVE, DOMAIN, tolerant=True)
    found = cache_rules.consult(DOMAIN, _stored(DEFECTIVE, now), None, now, CacheConfig())
    assert isinstance(found, cache_rules.Answer)
    assert found.decision.policy == fetched
    assert found.decision.policy_text == DEFECTIVE  # kept as fetched
    assert found.notes == ()


def test_a_stored_tolerant_policy_is_ignored_when_read_strictly() -> None:
    now = time.time()
    entry = _stored(DEFECTIVE, now)
    found = cache_rules.consult(DOMAIN, entry, None, now, CacheConfig(), tolerant=False)
    assert isinstance(found, cache_rules.Plan)
    assert found.cached is None
    assert [level for level, _ in found.notes] == [logging.WARNING]
    assert "cached policy no longer parses" in found.notes[0][1]


def test_a_fetched_policy_with_defects_gives_one_greppable_warning() -> None:
    now = time.time()
    plan = cache_rules.Plan(now, Entry.unknown(DOMAIN, now), None)
    policy = parse_policy(DEFECTIVE, DOMAIN, tolerant=True)
    outcome = cache_rules.after_fetch(
        DOMAIN, plan, Record("STSv1", "1"), (policy, DEFECTIVE), CacheConfig()
    )
    lines = [text for level, text in outcome.notes if text.startswith("policy-defects: ")]
    assert lines == [
        "policy-defects: example.com: byte-order mark; blank line; mx with trailing dot;"
        " read tolerantly ([policy] parsing)"
    ]
    assert outcome.entry.policy_text == DEFECTIVE
    clean = parse_policy(CLEAN, DOMAIN)
    outcome = cache_rules.after_fetch(
        DOMAIN, plan, Record("STSv1", "1"), (clean, CLEAN), CacheConfig()
    )
    assert not [text for _, text in outcome.notes if "policy-defects" in text]


def test_cache_show_names_the_defects_of_a_cached_policy(tmp_path: Path) -> None:
    now = time.time()
    cache_file = tmp_path / "cache.sqlite"
    store = SqliteStore(str(cache_file))
    try:
        store.put(_stored(DEFECTIVE, now))
    finally:
        store.close()
    settings = tmp_path / "config.toml"
    settings.write_text(f'[cache]\npath = "{cache_file}"\n', encoding="utf-8")
    shown = {}
    for output in ("plain", "json"):
        argv = [sys.executable, "-m", "postfix_mtasts", "cache", "show", "-c", str(settings)]
        argv += [DOMAIN, "--json"] if output == "json" else [DOMAIN]
        done = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done
        shown[output] = done.stdout
    assert "  defects:       byte-order mark; blank line; mx with trailing dot\n" in shown["plain"]
    policy = json.loads(shown["json"])["policy"]
    assert policy["defects"] == ["byte-order mark", "blank line", "mx with trailing dot"]


# --------------------------------------------------------------------------------------------------
# The corpus: every file's judgement and the figures of docs/policy-parsing.md, recomputed.


def _corpus() -> list[dict[str, Any]]:
    index: list[dict[str, Any]] = json.loads((CORPUS / "index.json").read_text(encoding="utf-8"))
    return index


def _judge(body: bytes) -> tuple[str, list[str], str]:
    """(judgement, defects, strict error) of one published policy."""
    try:
        parse_policy(body, "corpus.example")
        return "valid", [], ""
    except PolicySyntaxError as exc:
        strict_error = exc.cause
    try:
        policy = parse_policy(body, "corpus.example", tolerant=True)
    except PolicySyntaxError:
        return "invalid", [], strict_error
    return "tolerated", list(policy.defects), strict_error


def test_every_corpus_file_is_indexed_once_with_its_source() -> None:
    index = _corpus()
    files = sorted(p.name for p in CORPUS.glob("*.txt"))
    assert sorted(e["file"] for e in index) == files
    assert len({(CORPUS / name).read_bytes() for name in files}) == len(files)  # all distinct
    for entry in index:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry["repo"]), entry
        assert entry["path"].endswith("mta-sts.txt"), entry
        assert re.fullmatch(r"[0-9a-f]{40}", entry["commit"]), entry
        assert entry["judgement"] in ("valid", "tolerated", "invalid"), entry
        assert bool(entry.get("why")) == (entry["judgement"] == "invalid"), entry


@pytest.mark.parametrize("entry", _corpus(), ids=lambda e: e["file"])
def test_corpus_policy_is_judged_as_the_index_says(entry: dict[str, Any]) -> None:
    judgement, defects, strict_error = _judge((CORPUS / entry["file"]).read_bytes())
    assert judgement == entry["judgement"]
    assert defects == entry.get("defects", [])
    assert strict_error == entry.get("strict_error", "")


def _documented(heading: str) -> dict[str, int]:
    """The "| name | number |" rows of the table under the line ``heading`` in the doc."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows: dict[str, int] = {}
    for line in lines[start + 1 :]:
        if match := re.fullmatch(r"\| `?([^|`]+?)`? \| (\d+) \|", line):
            rows[match[1]] = int(match[2])
        elif rows and not line.startswith("|"):
            break
    return rows


def test_documented_corpus_figures_are_the_corpus_figures() -> None:
    judged = [_judge((CORPUS / e["file"]).read_bytes()) for e in _corpus()]
    kinds = Counter(judgement for judgement, _, _ in judged)
    assert _documented("`tests/test_tolerant.py` reads every file") == {
        "policies": len(judged),
        "valid under the strict grammar": kinds["valid"],
        "invalid under the strict grammar": kinds["tolerated"] + kinds["invalid"],
        "recovered by the tolerant reading": kinds["tolerated"],
        "invalid under both readings": kinds["invalid"],
    }
    defects = Counter(defect for _, found, _ in judged for defect in found)
    assert _documented("The defects the tolerant reading recovered") == dict(defects)
    share = round(100 * (kinds["tolerated"] + kinds["invalid"]) / len(judged))
    assert f"So {share}% of these policies" in DOC.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Through the real test bed: the daemon and query.

BOM_AND_DOTS = (
    "\ufeffversion: STSv1\r\nmode: enforce\r\nmx: mail.{d}.\r\nmx: *.{d}.\r\nmax_age: 86400\r\n\r\n"
)


def _publish(bed: Bed, prefix: str) -> str:
    domain = bed.unique_domain(prefix)
    bed.dns_set(f"mta-sts.{domain}", "A", [bed.https_address])
    bed.dns_set(f"_mta-sts.{domain}", "TXT", ["v=STSv1; id=1"])
    bed.https.set(f"mta-sts.{domain}", body=BOM_AND_DOTS.format(d=domain).encode("utf-8"))
    return domain


def _query(
    bed: Bed, domain: str, *options: str, config_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    config = ("--config", str(config_file)) if config_file else ()
    return querycli.query(bed, *config, *options, domain)


def test_daemon_answers_secure_for_an_enforce_policy_with_a_bom_and_trailing_dots(
    bed: Bed, tmp_path: Path
) -> None:
    domain = _publish(bed, "tolerant")
    with running_daemon(bed, tmp_path) as daemon:
        answer = daemon.request(domain)
    log = daemon.log_path.read_text(errors="replace")
    assert answer == f"OK secure match=mail.{domain}:.{domain} servername=hostname"
    lines = [line for line in log.splitlines() if "policy-defects: " in line]
    assert len(lines) == 1, log
    assert (
        f"policy-defects: {domain}: byte-order mark; blank line; mx with trailing dot;"
        in (lines[0])
    )


def test_daemon_set_to_strict_answers_notfound_for_the_same_policy(
    bed: Bed, tmp_path: Path
) -> None:
    domain = _publish(bed, "strict")
    with running_daemon(bed, tmp_path, settings={"policy": {"parsing": "strict"}}) as daemon:
        answer = daemon.request(domain)
    log = daemon.log_path.read_text(errors="replace")
    assert answer == "NOTFOUND "
    assert "policy-defects" not in log
    assert "invalid policy" in log


def _wait_for_log(daemon: Daemon, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.log_path.read_text(errors="replace")
        if text in log:
            return log
        time.sleep(0.1)
    pytest.fail(f"{text!r} not logged within {timeout} s; the log:\n{daemon.log()}")


def test_switching_to_strict_takes_effect_at_restart_and_drops_the_cached_policy(
    bed: Bed, tmp_path: Path
) -> None:
    domain = _publish(bed, "switch")
    secure = f"OK secure match=mail.{domain}:.{domain} servername=hostname"
    with running_daemon(bed, tmp_path, sqlite=True) as daemon:
        assert daemon.request(domain) == secure
        strict_text = daemon.config_text.replace(
            '[policy]\ntesting = "notfound"', '[policy]\ntesting = "notfound"\nparsing = "strict"'
        )
        assert strict_text != daemon.config_text
        daemon.config_path.write_text(strict_text)
        daemon.process.send_signal(signal.SIGHUP)
        log = _wait_for_log(daemon, "configuration reloaded")
        assert "policy.parsing takes effect at the next restart" in log
        # Memory still holds the policy read tolerantly.
        assert daemon.request(domain) == secure
    # The same cache file, now read strictly: the stored policy no longer parses, and the
    # fetch reads it strictly too.
    with running_daemon(
        bed, tmp_path, sqlite=True, settings={"policy": {"parsing": "strict"}}
    ) as daemon:
        assert daemon.request(domain) == "NOTFOUND "
    log = daemon.log_path.read_text(errors="replace")
    assert f"{domain}: cached policy no longer parses" in log


def test_query_shows_the_tolerated_defects_plain_and_in_json(bed: Bed, tmp_path: Path) -> None:
    domain = _publish(bed, "query")
    plain = _query(bed, domain)
    assert plain.returncode == 0, plain
    assert (
        "  policy defects (tolerated; the domain should fix them):"
        " byte-order mark; blank line; mx with trailing dot" in plain.stdout
    )
    assert (
        f"postfix answer: OK secure match=mail.{domain}:.{domain} servername=hostname"
        in plain.stdout
    )
    as_json = _query(bed, domain, "--json")
    assert as_json.returncode == 0, as_json
    result = json.loads(as_json.stdout)
    assert result["policy_defects"] == ["byte-order mark", "blank line", "mx with trailing dot"]
    assert result["policy"]["mx"] == [f"mail.{domain}", f"*.{domain}"]
    strict_config = tmp_path / "strict.toml"
    strict_config.write_text('[policy]\nparsing = "strict"\n', encoding="utf-8")
    strict = _query(bed, domain, "--json", config_file=strict_config)
    assert strict.returncode == 1, strict
    result = json.loads(strict.stdout)
    assert result["policy"] is None and result["policy_defects"] == []
    assert result["error"]["type"] == "PolicySyntaxError"
