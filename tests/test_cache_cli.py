"""``postfix-mtasts cache``, run as a postmaster runs it: the installed command, ``-c FILE``, a
real store (SQLite files; Redis and PostgreSQL on the session's servers), and for ``refresh``
and ``warm`` the bed's real DNS and HTTPS servers.

The entries a test starts from are put into the store directly; what the command did is read
back from the store, from its output and from the bed's request counts."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from bed import SCENARIOS, Bed, domain_of
from dbservers import PASSWORD, free_port
from mtasts_daemon import daemon_config

from postfix_mtasts import cache_rules, cachecmd
from postfix_mtasts.config import CacheConfig
from postfix_mtasts.mtasts import Record
from postfix_mtasts.store import Entry, Store, open_store

# The command's deadline: far above what any subcommand takes on a loaded machine.
COMMAND_TIMEOUT = 120
SHARED = ("sqlite", "redis", "postgresql")

NOW = time.time()
DAY = 86400.0
_names = itertools.count()


def policy(domain: str, mode: str = "enforce") -> str:
    return f"version: STSv1\nmode: {mode}\nmx: mail.{domain}\nmx: *.example.net\nmax_age: 86400\n"


def entry(domain: str, mode: str | None = "enforce", **changes: Any) -> Entry:
    """A domain as a fetch an hour ago left it (``mode`` None: no record)."""
    base = Entry(
        domain=domain,
        record_id="old1" if mode else None,
        policy_text=policy(domain, mode) if mode else None,
        fetched_at=NOW - 3600 if mode else None,
        expires_at=NOW - 3600 + DAY if mode else None,
        checked_at=NOW - 60,
        last_used=NOW - 30,
        last_error="" if mode else "no MTA-STS record",
        backoff_until=0.0 if mode else NOW + 3600,
    )
    return replace(base, **changes)


def cli() -> str:
    found = shutil.which("postfix-mtasts")
    assert found is not None, "postfix-mtasts is not on PATH (install the package, see tests/run)"
    return found


def run(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cli(), "cache", *args[:1], "-c", str(config), *args[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def one_stderr_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    return lines[0]


@dataclass
class Cache:
    """One store as a configuration file names it, and a way to open it in the test."""

    config: Path
    backend: str
    settings: dict[str, object]

    def open(self) -> Store:
        cache = CacheConfig(
            backend=self.backend,  # type: ignore[arg-type]
            path=str(self.settings.get("path", "")),
            url=str(self.settings.get("url", "")),
            prefix=str(self.settings.get("prefix", CacheConfig.prefix)),
            table=str(self.settings.get("table", CacheConfig.table)),
        )
        name = cache.prefix if cache.backend == "redis" else cache.table
        return open_store(cache.backend, cache.path, url=cache.url, name=name, timeout=5.0)

    def put(self, *entries: Entry) -> None:
        store = self.open()
        try:
            for one in entries:
                store.put(one)
        finally:
            store.close()

    def get(self, domain: str) -> Entry | None:
        store = self.open()
        try:
            return store.get(domain)
        finally:
            store.close()

    def all(self) -> list[Entry]:
        store = self.open()
        try:
            return list(store.entries())
        finally:
            store.close()


def make_cache(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, bed: Bed | None = None
) -> Cache:
    n = next(_names)
    settings: dict[str, object] = {"backend": backend}
    if backend == "sqlite":
        settings["path"] = str(tmp_path / f"cache{n}" / "cache.sqlite")
    elif backend == "redis":
        settings.update(url=request.getfixturevalue("redis_server").url, prefix=f"cli{n}:")
    elif backend == "postgresql":
        settings.update(url=request.getfixturevalue("postgres_server").url, table=f"cli_{n}")
    config = tmp_path / f"config{n}.toml"
    if bed is not None:
        text = daemon_config(bed, ["inet:127.0.0.1:8461"], settings={"cache": settings})
    else:
        lines = ["[cache]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
        lines += ["", "[maps.strict]", 'testing = "secure"']
        lines += ["", "[maps.opportunistic]", 'testing = "may"']
        text = "\n".join(lines) + "\n"
    config.write_text(text)
    return Cache(config, backend, settings)


@pytest.fixture(params=SHARED)
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Cache:
    """A store of each shared backend in turn, on a namespace of this test's own."""
    return make_cache(request, tmp_path, request.param)


@pytest.fixture
def sqlite_cache(request: pytest.FixtureRequest, tmp_path: Path) -> Cache:
    return make_cache(request, tmp_path, "sqlite")


@pytest.fixture
def bed_cache(request: pytest.FixtureRequest, tmp_path: Path, bed: Bed) -> Cache:
    """A SQLite store, with a configuration that looks domains up at the bed."""
    return make_cache(request, tmp_path, "sqlite", bed)


# --------------------------------------------------------------------------------------------------
# list, show


def test_list_prints_one_line_per_domain_with_mode_mx_times_and_error(cache: Cache) -> None:
    cache.put(entry("b.example"), entry("a.example", None), entry("c.example", "testing"))
    result = run(cache.config, "list")
    assert result.returncode == 0, result
    header, *lines = result.stdout.splitlines()
    assert header.split() == [
        "DOMAIN",
        "MODE",
        "FETCHED",
        "EXPIRES",
        "LAST-USED",
        "MX",
        "LAST-ERROR",
    ]
    rows = [line.split(" ", 6) for line in lines]
    assert [row[0] for row in rows] == ["a.example", "b.example", "c.example"]
    a, b, c = rows
    assert a[1] == "-" and a[2] == "-" and a[5] == "-" and a[6] == "no MTA-STS record"
    assert b[1] == "enforce" and b[5] == "mail.b.example,*.example.net" and b[6] == "-"
    assert b[2] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 3600))
    assert b[3] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 3600 + DAY))
    assert c[1] == "testing"


def test_list_json_is_one_object_per_line(cache: Cache) -> None:
    cache.put(entry("a.example"), entry("b.example", None))
    result = run(cache.config, "list", "--json")
    assert result.returncode == 0, result
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["domain"] for row in rows] == ["a.example", "b.example"]
    assert rows[0]["mode"] == "enforce" and rows[0]["mx"] == ["mail.a.example", "*.example.net"]
    assert rows[1]["mode"] is None and rows[1]["last_error"] == "no MTA-STS record"


def test_list_marks_an_expired_policy(sqlite_cache: Cache) -> None:
    sqlite_cache.put(entry("old.example", expires_at=NOW - 10))
    result = run(sqlite_cache.config, "list")
    assert result.stdout.splitlines()[1].split()[1] == "enforce(expired)"


def test_show_prints_the_entry_the_policy_and_each_maps_answer(cache: Cache) -> None:
    cache.put(entry("testing.example", "testing"))
    result = run(cache.config, "show", "--json", "Testing.Example.")
    assert result.returncode == 0, result
    shown = json.loads(result.stdout)
    assert Entry(**shown["entry"]) == entry("testing.example", "testing")
    assert shown["policy"]["mode"] == "testing"
    assert shown["policy"]["mx"] == ["mail.testing.example", "*.example.net"]
    secure = "OK secure match=mail.testing.example:.example.net servername=hostname"
    assert shown["answers"] == {
        "postfix": "NOTFOUND ",
        "opportunistic": "OK may",
        "strict": secure,
    }
    text = run(cache.config, "show", "testing.example")
    assert text.returncode == 0, text
    assert f"strict: {secure}" in text.stdout
    assert "record id:     old1" in text.stdout
    assert "    mode: testing" in text.stdout


def test_show_says_when_the_daemon_would_look_the_domain_up(sqlite_cache: Cache) -> None:
    sqlite_cache.put(entry("gone.example", expires_at=NOW - 10))
    shown = json.loads(run(sqlite_cache.config, "show", "--json", "gone.example").stdout)
    assert shown["answers"] == {}
    assert "looks the domain up" in shown["answers_note"]


def test_show_of_a_domain_not_held_exits_1_with_one_line(cache: Cache) -> None:
    cache.put(entry("a.example"))
    result = run(cache.config, "show", "other.example")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "other.example: not in the cache" in one_stderr_line(result)


# --------------------------------------------------------------------------------------------------
# forget


def test_forget_deletes_the_entries_and_says_how_many(cache: Cache) -> None:
    cache.put(entry("a.example"), entry("b.example"), entry("c.example"))
    result = run(cache.config, "forget", "a.example", "C.EXAMPLE", "never.example")
    assert result.returncode == 0, result
    assert result.stdout.startswith("forgot 2 of 3 domain(s)")
    assert [e.domain for e in cache.all()] == ["b.example"]


# --------------------------------------------------------------------------------------------------
# export, import


def test_export_writes_every_field_of_every_entry_as_json_lines(sqlite_cache: Cache) -> None:
    entries = [entry("a.example"), entry("b.example", None, last_error="x\ny \u00e9")]
    sqlite_cache.put(*entries)
    result = run(sqlite_cache.config, "export")
    assert result.returncode == 0, result
    assert [Entry(**json.loads(line)) for line in result.stdout.splitlines()] == entries


@pytest.mark.parametrize("target", SHARED)
def test_export_then_import_gives_equal_entries_in_another_store(
    request: pytest.FixtureRequest, tmp_path: Path, target: str
) -> None:
    source = make_cache(request, tmp_path, "sqlite")
    destination = make_cache(request, tmp_path, target)
    entries = [
        entry("a.example"),
        entry("b.example", None),
        entry("c.example", "testing", last_used=NOW + 0.123456789, backoff_until=NOW + 1e-6),
        entry("xn--bcher-kva.example", "none", checked_at=None),
    ]
    source.put(*entries)
    exported = run(source.config, "export")
    assert exported.returncode == 0, exported
    imported = run(destination.config, "import", "-", stdin=exported.stdout)
    assert imported.returncode == 0, imported
    assert imported.stdout.strip() == "imported 4 entries"
    assert destination.all() == entries
    again = run(destination.config, "export")
    assert again.stdout == exported.stdout


def test_import_reports_each_bad_line_by_number_and_stores_the_good_ones(
    sqlite_cache: Cache, tmp_path: Path
) -> None:
    good = json.dumps(cachecmd.entry_to_json(entry("good.example")))

    def changed(**fields: object) -> str:
        return json.dumps({**cachecmd.entry_to_json(entry("bad.example")), **fields})

    lines = [
        good,
        "{not json",
        changed(domain="Bad.Example"),
        changed(domain="[192.0.2.1]"),
        changed(last_used="yesterday"),
        changed(expires_at=True),
        changed(policy_text="x" * 70000),
        changed(policy_text="version: STSv1\nmode: sometimes\n"),
        changed(record_id="no-dash!"),
        changed(extra=1),
        json.dumps({"domain": "bad.example"}),
        "[1, 2]",
        changed(last_used=1e400),
        '{"last_used": NaN}',
        "x" * (cachecmd.MAX_IMPORT_LINE + 10),
        "",
        json.dumps(cachecmd.entry_to_json(entry("also-good.example", None))),
    ]
    path = tmp_path / "import.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = run(sqlite_cache.config, "import", str(path))
    assert result.returncode == 1
    reported = result.stderr.splitlines()
    numbers = [int(line.split(": line ")[1].split(":")[0]) for line in reported]
    assert numbers == list(range(2, 16))
    assert all(line.startswith(f"{path}: line ") for line in reported)
    assert "policy_text: 70000 characters" in reported[5]
    assert "imported 2 entries; skipped 14 bad line(s)" in result.stdout
    assert [e.domain for e in sqlite_cache.all()] == ["also-good.example", "good.example"]


# --------------------------------------------------------------------------------------------------
# A store that cannot be used.


@pytest.mark.parametrize(
    ("backend", "url"),
    [
        ("redis", f"redis://fleet:{PASSWORD}@127.0.0.1:{{port}}/0"),
        ("postgresql", f"postgresql://fleet:{PASSWORD}@127.0.0.1:{{port}}/mtasts"),
    ],
)
@pytest.mark.parametrize(
    "args", [("list",), ("show", "a.example"), ("forget", "a.example"), ("export",)]
)
def test_an_unreachable_store_gives_one_line_naming_it_and_exit_2(
    tmp_path: Path, backend: str, url: str, args: tuple[str, ...]
) -> None:
    port = free_port()  # nothing listens on it
    config = tmp_path / "config.toml"
    config.write_text(
        f'[cache]\nbackend = "{backend}"\nurl = "{url.format(port=port)}"\ntimeout = 2\n'
    )
    started = time.monotonic()
    result = run(config, *args)
    assert result.returncode == 2
    line = one_stderr_line(result)
    assert f"127.0.0.1:{port}" in line
    assert PASSWORD not in result.stderr + result.stdout
    assert line.startswith(f"postfix-mtasts cache {args[0]}: ")
    assert time.monotonic() - started < 60


def test_the_memory_backend_has_no_store_for_the_commands(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[cache]\nbackend = "memory"\n')
    result = run(config, "list")
    assert result.returncode == 2
    assert "memory" in one_stderr_line(result)


def test_a_missing_cache_file_is_reported_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "cache.sqlite"
    config = tmp_path / "config.toml"
    config.write_text(f'[cache]\nbackend = "sqlite"\npath = "{path}"\n')
    result = run(config, "list")
    assert result.returncode == 2
    assert str(path) in one_stderr_line(result)
    assert not path.parent.exists()


def test_a_file_that_is_not_a_cache_gives_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    path.write_text("not a database\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[cache]\nbackend = "sqlite"\npath = "{path}"\n')
    result = run(config, "export")
    assert result.returncode == 2
    assert "not a postfix-mtasts cache" in one_stderr_line(result)
    assert path.read_text() == "not a database\n"


# --------------------------------------------------------------------------------------------------
# refresh and warm, against the bed.


def hosts(*labels: str) -> list[str]:
    return [f"mta-sts.{domain_of(label)}" for label in labels]


def counts(bed: Bed, *labels: str) -> list[int]:
    return [bed.https.request_count(host) for host in hosts(*labels)]


def test_refresh_fetches_and_stores_the_policy(bed: Bed, bed_cache: Cache) -> None:
    domain = domain_of("enforce")
    before = counts(bed, "enforce")
    result = run(bed_cache.config, "refresh", domain)
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"{domain}: enforce policy, id enforce20240101")
    assert counts(bed, "enforce") == [before[0] + 1]
    stored = bed_cache.get(domain)
    assert stored is not None and stored.record_id == SCENARIOS["enforce"].record_id
    assert stored.policy_text is not None and "mode: enforce" in stored.policy_text


def test_refresh_fetches_even_when_the_cached_id_is_current(bed: Bed, bed_cache: Cache) -> None:
    domain = domain_of("testing")
    fresh = entry(domain, "enforce", record_id=SCENARIOS["testing"].record_id, checked_at=NOW)
    bed_cache.put(fresh)
    before = counts(bed, "testing")
    result = run(bed_cache.config, "refresh", domain)
    assert result.returncode == 0, result
    assert counts(bed, "testing") == [before[0] + 1]
    stored = bed_cache.get(domain)
    assert stored is not None and stored.policy_text is not None
    assert "mode: testing" in stored.policy_text
    # enforce -> testing: told as the daemon tells it (docs/policy-changes.md).
    assert f"policy-change: {domain}: mode enforce -> testing" in result.stderr


def test_a_failed_refresh_keeps_the_cached_policy_and_exits_1(bed: Bed, bed_cache: Cache) -> None:
    failing = domain_of("error500")
    cached = entry(failing)
    bed_cache.put(cached)
    result = run(bed_cache.config, "refresh", failing, domain_of("norecord"))
    assert result.returncode == 1, result
    first, second = result.stdout.splitlines()
    assert first.startswith(f"{failing}: FAILED: refresh failed, kept cached")
    assert second.startswith(f"{domain_of('norecord')}: no policy")
    stored = bed_cache.get(failing)
    assert stored is not None
    assert stored.policy_text == cached.policy_text and stored.expires_at == cached.expires_at
    assert "500" in stored.last_error and stored.backoff_until > NOW


def maillog_line(agent: str, recipient: str, status: str = "sent") -> str:
    return (
        f"Dec  5 12:00:00 mx1 {agent}[4711]: 4F3B21234: to=<{recipient}>,"
        f" relay=mx.example.net[192.0.2.25]:25, delay=1.2, delays=0.1/0/0.5/0.6, dsn=2.0.0,"
        f" status={status} (250 2.0.0 Ok: queued as 1234)"
    )


def test_warm_looks_up_the_domains_of_sent_mail_it_does_not_hold(
    bed: Bed, bed_cache: Cache, tmp_path: Path
) -> None:
    enforce, testing, none = (domain_of(label) for label in ("enforce", "testing", "none"))
    cname, othertxt = domain_of("cname"), domain_of("othertxt")
    bed_cache.put(entry(testing, "testing"))
    log = tmp_path / "mail.log"
    log.write_text(
        "\n".join(
            [
                maillog_line("postfix/smtp", f"alice@{enforce}"),
                maillog_line("postfix/smtp", f"bob@{enforce.upper()}"),
                maillog_line("postfix-out/smtp", f"carol@{none}"),
                maillog_line("postfix/smtp", f"dave@{testing}"),  # held: skipped
                maillog_line("postfix/lmtp", f"erin@{cname}"),  # lmtp: not MTA-STS
                maillog_line("postfix/smtp", f"frank@{othertxt}", status="deferred"),
                maillog_line("postfix/smtp", "x@" + "a" * 9000 + ".example"),  # too long
                "Dec  5 12:00:01 mx1 postfix/qmgr[12]: 4F3B21234: removed",
            ]
        )
        + "\n"
    )
    before = counts(bed, "enforce", "testing", "none", "cname", "othertxt")
    result = run(bed_cache.config, "warm", "--from-maillog", str(log))
    assert result.returncode == 0, result
    after = counts(bed, "enforce", "testing", "none", "cname", "othertxt")
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 0, 1, 0, 0]
    summary = result.stdout.splitlines()[-1]
    assert summary.startswith("warm: 3 domain(s), 1 already cached, 2 looked up")
    assert "1 log line(s) too long" in summary
    assert {e.domain for e in bed_cache.all()} == {enforce, testing, none}
    # A second run finds them all held.
    again = run(bed_cache.config, "warm", "--from-maillog", str(log))
    assert again.stdout.splitlines()[-1].startswith("warm: 3 domain(s), 3 already cached")
    assert counts(bed, "enforce", "testing", "none", "cname", "othertxt") == after


def test_warm_starts_at_most_rate_lookups_a_second(bed: Bed, bed_cache: Cache) -> None:
    domains = [domain_of(label) for label in ("norecord", "tworecords", "badrecord", "noid")]
    started = time.monotonic()
    result = run(bed_cache.config, "warm", "--rate", "2", "--jobs", "4", *domains)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result
    assert "4 looked up: 0 with a policy, 4 without, 0 failed" in result.stdout
    # Four starts, half a second apart: the last no sooner than 1.5 s after the first.
    assert elapsed >= 1.5


def test_warm_reports_failures_and_exits_1(bed: Bed, bed_cache: Cache) -> None:
    result = run(bed_cache.config, "warm", domain_of("error500"), domain_of("enforce"))
    assert result.returncode == 1, result
    assert "2 looked up: 1 with a policy, 0 without, 1 failed" in result.stdout


# --------------------------------------------------------------------------------------------------
# The pure parts.


def test_delivered_domains_reads_smtp_deliveries_once_each() -> None:
    lines: list[bytes | None] = [
        maillog_line("postfix/smtp", "a@One.Example").encode(),
        maillog_line("postfix/relay/smtp", '"odd user"@two.example').encode(),
        maillog_line("postfix/smtp", "b@one.example").encode(),
        maillog_line("postfix/smtp", "c@[192.0.2.1]").encode(),
        maillog_line("postfix/lmtp", "d@three.example").encode(),
        maillog_line("postfix/smtp", "e@four.example", "bounced").encode(),
        maillog_line("postfix/smtpd", "f@five.example").encode(),
        None,
    ]
    assert cachecmd.delivered_domains(lines) == (["one.example", "two.example"], 1)


def test_a_forced_refresh_keeps_an_unexpired_policy_when_the_fetch_fails() -> None:
    settings = CacheConfig(backend="memory", path="")
    held = entry("a.example")
    plan = cache_rules.forced_plan("a.example", held, NOW)
    assert plan.cached is not None
    step = cache_rules.forced_step("a.example", plan, Record("STSv1", "old1"), settings)
    assert isinstance(step, cache_rules.Fetch)
    from postfix_mtasts.mtasts import PolicyFetchError

    failed = PolicyFetchError("a.example", "HTTP 500")
    outcome = cache_rules.after_fetch("a.example", plan, step.record, failed, settings)
    assert outcome.entry.policy_text == held.policy_text
    assert outcome.entry.expires_at == held.expires_at


def test_a_forced_refresh_drops_an_expired_policy() -> None:
    plan = cache_rules.forced_plan("a.example", entry("a.example", expires_at=NOW - 1), NOW)
    assert plan.cached is None and plan.base.policy_text is None


def test_entry_from_json_refuses_infinite_times() -> None:
    line = json.dumps({**cachecmd.entry_to_json(entry("a.example")), "last_used": math.inf})
    with pytest.raises(cachecmd.BadLine):
        cachecmd.entry_from_json(line)
