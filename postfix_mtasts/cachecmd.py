"""``postfix-mtasts cache``: the policy cache as a postmaster sees it, on the configured store.

The daemon keeps one entry per policy domain in its store (SQLite, Redis or PostgreSQL: see
:mod:`postfix_mtasts.store`). These commands open the same store, as the configuration names it,
and work on it beside any daemon that shares it:

- ``list`` and ``show`` read it; ``show`` also builds the answer each configured map gives now,
  the way the daemon does (:func:`cache_rules.consult` makes a decision of the entry,
  :func:`postfix.policy_reply` a reply of the decision and the map's profile);
- ``forget`` deletes entries (the store tells the daemons sharing it);
- ``refresh`` and ``warm`` look domains up now and store what the cache rules make of the
  outcome (:func:`cache_rules.forced_plan`, :func:`cache_rules.after_fetch`...): a failure keeps
  a cached policy, exactly as in the daemon;
- ``export`` and ``import`` move entries as JSON lines, between backends or machines.

Everything read from outside (an import file, a mail log) is read in lines of bounded length and
checked before it reaches the store. A store that cannot be opened or reached ends the command
with one line on standard error naming the store and the cause (never a password).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import IO, Any, NoReturn
from urllib.parse import unquote, urlsplit

from postfix_mtasts import cache_rules, mtasts, postfix
from postfix_mtasts.cache_rules import Answer, Fetch
from postfix_mtasts.config import CacheConfig, Config
from postfix_mtasts.store import (
    MAX_POLICY_TEXT,
    Entry,
    Store,
    StoreError,
    open_store,
    redact_url,
    where_of,
)

__all__ = [
    "EXIT_OK",
    "EXIT_SOME",
    "EXIT_TROUBLE",
    "BadLine",
    "delivered_domains",
    "entry_from_json",
    "entry_to_json",
    "run",
    "store_where",
]

# Exit statuses, the same for every subcommand.
EXIT_OK = 0
# A domain the cache does not hold (show), a lookup that failed (refresh, warm), a line refused
# (import).
EXIT_SOME = 1
# A usage or configuration error, a store that cannot be opened or reached, a file that cannot
# be read.
EXIT_TROUBLE = 2

# The longest mail log line read: Postfix's own lines are far shorter (its line_length_limit
# concerns mail, not logs), and a longer one is not a delivery record of Postfix.
MAX_LOG_LINE = 8192
# The longest import line: a policy text at its limit, every character escaped by JSON as
# \\uXXXX, and the other fields.
MAX_IMPORT_LINE = 6 * MAX_POLICY_TEXT + 8192
# The longest last_error accepted by import (the daemon's are one line of a few hundred).
MAX_ERROR_TEXT = 4096
# How many refused import lines are reported one by one; the rest are counted.
MAX_REPORTED_LINES = 100

_ENTRY_FIELDS = tuple(f.name for f in fields(Entry))
_RECORD_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# A delivery by Postfix's SMTP client: "postfix/smtp[PID]:", or with an instance's or a
# service's syslog_name ("postfix-out/smtp[PID]:", "postfix/relay/smtp[PID]:"); lmtp and the
# other delivery agents are not MTA-STS deliveries.
_SMTP_DELIVERY = re.compile(
    rb"(?:^|\s)postfix(?:-[^\s/\[\]]+)?(?:/[^\s/\[\]]+)*/smtp\[[0-9]+\]: .*?\bto=<([^<>]*)>"
    rb".*\bstatus=sent\b"
)


class CommandError(Exception):
    """Ends a subcommand with one line on standard error and EXIT_TROUBLE."""


def _iso(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC, to the second."""
    if timestamp is None or not math.isfinite(timestamp):
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
    except (OverflowError, OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# The store, named for messages without its password.


def store_where(cache: CacheConfig) -> str:
    """The configured store as messages name it (the store's own ``where``)."""
    name = cache.table if cache.backend == "postgresql" else cache.prefix
    return where_of(cache.backend, cache.path, cache.url, name)


def _secrets(url: str) -> list[str]:
    """The password in ``url`` (either form), which no message may show even if a library
    quoted the URL in an error."""
    found = re.findall(r"(?i)password\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]+)", url)
    if "://" in url:
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            # As written, and as a library that decoded it would quote it.
            found += [password, unquote(password)]
    return [secret.strip("'") for secret in found if secret.strip("'")]


def _store_failure(cache: CacheConfig, exc: BaseException) -> str:
    """One line: the store and why it failed."""
    where = store_where(cache)
    message = " ".join(str(exc).split()) or type(exc).__name__
    for secret in _secrets(cache.url):
        message = message.replace(secret, "***")
    plain = redact_url(cache.url) if cache.url else cache.path
    if plain and plain in message:
        return message
    return f"{where}: {message}"


def _open(settings: Config, *, must_exist: bool) -> Store:
    cache = settings.cache
    if cache.backend == "memory":
        raise CommandError(
            'cache.backend is "memory": that cache lives in the daemon\'s memory only, and there'
            " is no store for this command to work on"
        )
    if must_exist and cache.backend == "sqlite" and not os.path.exists(cache.path):
        # Reading a file that is not there would create an empty cache; say so instead.
        raise CommandError(f"{cache.path}: no cache file (the daemon has not written one yet)")
    name = cache.prefix if cache.backend == "redis" else cache.table
    try:
        return open_store(
            cache.backend, cache.path, url=cache.url, name=name, timeout=cache.timeout
        )
    except StoreError as exc:
        raise CommandError(_store_failure(cache, exc)) from exc
    except ImportError as exc:
        # The backend's client library (an extra: postfix-mtasts[redis], [postgresql]) is not
        # installed.
        raise CommandError(
            f"{store_where(cache)}: the {cache.backend} backend cannot be loaded ({exc});"
            f" install postfix-mtasts[{cache.backend}]"
        ) from exc


def run(args: argparse.Namespace, settings: Config) -> int:
    """Run the ``cache`` subcommand named by ``args.cache_command``; its exit status."""
    command: Callable[[argparse.Namespace, Config], int] = _COMMANDS[args.cache_command]
    # The store clients log failed connections on their own, which Python would print to
    # stderr: the command reports a failure once, in its one line.
    for client in ("psycopg", "redis"):
        logging.getLogger(client).setLevel(logging.CRITICAL)
    try:
        return command(args, settings)
    except CommandError as exc:
        print(f"postfix-mtasts cache {args.cache_command}: {exc}", file=sys.stderr)
        return EXIT_TROUBLE
    except StoreError as exc:
        line = _store_failure(settings.cache, exc)
        print(f"postfix-mtasts cache {args.cache_command}: {line}", file=sys.stderr)
        return EXIT_TROUBLE
    except BrokenPipeError:
        # The reader went away (`cache list | head`): stop quietly, and keep Python from
        # reporting the pipe again when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _domain(text: str) -> str:
    """A domain given on the command line, as the daemon keys it (lowercase A-labels)."""
    domain = postfix.policy_domain(text)
    if domain is None:
        raise CommandError(f"{text!r} is not a domain name an MTA-STS policy can apply to")
    return domain


def _domains(texts: Iterable[str]) -> list[str]:
    # Dict keys: given twice, looked up once, in the order given.
    return list(dict.fromkeys(_domain(text) for text in texts))


# --------------------------------------------------------------------------------------------------
# list, show


def _policy(entry: Entry, tolerant: bool) -> tuple[mtasts.Policy | None, str]:
    """The entry's policy parsed (``tolerant``: as ``[policy] parsing = "tolerant"`` reads it), or
    None and why not ("" when it holds none)."""
    if entry.policy_text is None:
        return None, ""
    try:
        return mtasts.parse_policy(entry.policy_text, entry.domain, tolerant=tolerant), ""
    except mtasts.PolicySyntaxError as exc:
        return None, f"the cached policy does not parse: {exc.cause}"


def _summary(entry: Entry, now: float, tolerant: bool) -> dict[str, Any]:
    policy, problem = _policy(entry, tolerant)
    expired = entry.expires_at is not None and entry.expires_at <= now
    return {
        "domain": entry.domain,
        "mode": None if policy is None else str(policy.mode),
        "mx": [] if policy is None else [str(mx) for mx in policy.mx],
        "expired": entry.policy_text is not None and expired,
        "fetched": _iso(entry.fetched_at),
        "expires": _iso(entry.expires_at),
        "last_used": _iso(entry.last_used),
        "last_error": entry.last_error or problem,
    }


def _list(args: argparse.Namespace, settings: Config) -> int:
    store = _open(settings, must_exist=True)
    try:
        now = time.time()
        if not args.json:
            print("DOMAIN MODE FETCHED EXPIRES LAST-USED MX LAST-ERROR")
        for entry in store.entries():
            row = _summary(entry, now, settings.tolerant)
            if args.json:
                print(json.dumps(row))
                continue
            mode = row["mode"] or ("unparsable" if entry.policy_text is not None else "-")
            if row["expired"]:
                mode += "(expired)"
            print(
                " ".join(
                    [
                        entry.domain,
                        mode,
                        row["fetched"] or "-",
                        row["expires"] or "-",
                        row["last_used"] or "-",
                        ",".join(row["mx"]) or "-",
                        # The error comes from the network and the store: one printable line.
                        _one_line(row["last_error"]) or "-",
                    ]
                )
            )
    finally:
        _close(store)
    return EXIT_OK


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))


def _answers(entry: Entry, settings: Config, now: float) -> tuple[dict[str, str], str]:
    """The reply each map gives for the entry now (``postfix``: the ``[policy]`` profile, then
    every ``[maps.NAME]``), built as the daemon builds it; empty, with the reason, when the
    daemon would look the domain up before answering."""
    found = cache_rules.consult(
        entry.domain, entry, None, now, settings.cache, tolerant=settings.tolerant
    )
    if not isinstance(found, Answer):
        return {}, "no answer in force: the daemon looks the domain up at its next request"
    decision = found.decision
    names = ["postfix", *sorted(name for name in settings.maps if name != "postfix")]
    answers = {
        name: postfix.policy_reply(
            decision.policy, settings.profile(name), decision.domain, decision.policy_text
        )
        for name in names
    }
    note = "its TXT record is due for a check, made right after this answer" if found.check else ""
    return answers, note


def _show(args: argparse.Namespace, settings: Config) -> int:
    domain = _domain(args.domain)
    store = _open(settings, must_exist=True)
    try:
        entry = store.get(domain)
    finally:
        _close(store)
    if entry is None:
        print(f"{domain}: not in the cache ({store_where(settings.cache)})", file=sys.stderr)
        return EXIT_SOME
    now = time.time()
    policy, problem = _policy(entry, settings.tolerant)
    answers, note = _answers(entry, settings, now)
    dane = settings.dane.enabled
    if args.json:
        print(
            json.dumps(
                {
                    "entry": entry_to_json(entry),
                    "times": {
                        name: _iso(getattr(entry, name))
                        for name in (
                            "fetched_at",
                            "expires_at",
                            "checked_at",
                            "last_used",
                            "backoff_until",
                        )
                    },
                    "policy": None
                    if policy is None
                    else {
                        "version": policy.version,
                        "mode": str(policy.mode),
                        "mx": [str(mx) for mx in policy.mx],
                        "max_age": policy.max_age,
                        "extensions": [list(e) for e in policy.extensions],
                        # What the tolerant reading accepted, for the domain's postmaster.
                        "defects": [mtasts.printable_defects((d,)) for d in policy.defects],
                    },
                    "policy_problem": problem,
                    "answers": answers,
                    "answers_note": note,
                    "dane_first": dane,
                }
            )
        )
        return EXIT_OK
    lines = [entry.domain]
    for label, value in (
        ("record id", entry.record_id or "-"),
        ("fetched", _when(entry.fetched_at)),
        ("expires", _when(entry.expires_at)),
        ("TXT checked", _when(entry.checked_at)),
        ("last used", _when(entry.last_used)),
        ("last error", _one_line(entry.last_error) or "-"),
        ("backoff until", _when(entry.backoff_until or None)),
    ):
        lines.append(f"  {label + ':':<15}{value}")
    if policy is not None:
        lines.append(
            f"  {'policy:':<15}{policy.mode}, max_age {policy.max_age},"
            f" mx {', '.join(str(mx) for mx in policy.mx)}"
        )
        if policy.defects:
            lines.append(f"  {'defects:':<15}{mtasts.printable_defects(policy.defects)}")
    elif problem:
        lines.append(f"  {'policy:':<15}{problem}")
    else:
        lines.append(f"  {'policy:':<15}none cached")
    if entry.policy_text is not None:
        lines.append("  policy text:")
        lines.extend(f"    {_one_line(line)}" for line in entry.policy_text.splitlines())
    lines.append("  answers now:")
    lines.extend(f"    {name}: {reply}" for name, reply in answers.items())
    if note:
        lines.append(f"    ({note})")
    if dane:
        lines.append("    (DANE is enabled: a validated DANE policy of the domain comes first)")
    print("\n".join(lines))
    return EXIT_OK


def _when(timestamp: float | None) -> str:
    iso = _iso(timestamp)
    return "-" if iso is None else f"{iso} ({timestamp})"


# --------------------------------------------------------------------------------------------------
# forget


def _forget(args: argparse.Namespace, settings: Config) -> int:
    domains = _domains(args.domains)
    store = _open(settings, must_exist=True)
    try:
        deleted = store.delete(domains)
    finally:
        _close(store)
    print(f"forgot {deleted} of {len(domains)} domain(s) given (the others were not held)")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# refresh, warm


@dataclass(frozen=True, slots=True)
class _LookedUp:
    domain: str
    summary: str
    failed: bool
    policy: bool


class _Lookups:
    """Looks domains up and stores what the cache rules make of it, as the daemon does
    (``policydb._conclude``), but for any domain at any time."""

    def __init__(self, settings: Config, store: Store) -> None:
        from postfix_mtasts import service

        self.settings = settings
        self.store = store
        try:
            self.resolver = service.make_resolver(settings)
            self.fetcher = service.make_fetcher(settings, self.resolver)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc

    def look_up(self, domain: str) -> _LookedUp:
        from postfix_mtasts.resolver import LocalError

        rules = self.settings.cache
        tolerant = self.settings.tolerant
        plan = cache_rules.forced_plan(
            domain, self.store.get(domain), time.time(), tolerant=tolerant
        )
        try:
            record: mtasts.Record | mtasts.MTASTSError
            try:
                record, _ = mtasts.lookup_record(domain, self.resolver)
            except mtasts.MTASTSError as exc:
                record = exc
            failed = isinstance(record, mtasts.DNSError)
            step = cache_rules.forced_step(domain, plan, record, rules)
            if isinstance(step, Fetch):
                fetched: tuple[mtasts.Policy, str] | mtasts.MTASTSError
                try:
                    fetched = mtasts.fetch_policy(domain, self.fetcher, tolerant=tolerant)
                except mtasts.MTASTSError as exc:
                    fetched = exc
                    failed = True
                outcome = cache_rules.after_fetch(domain, plan, step.record, fetched, rules)
            else:
                outcome = step
        except LocalError as exc:
            # This machine failed, not the domain: nothing to remember about the domain.
            return _LookedUp(domain, f"not looked up ({exc}); cache unchanged", True, False)
        self.store.put(outcome.entry)
        for _, note in outcome.notes:
            if note.startswith(cache_rules.CHANGE_PREFIX):
                # A policy change the operator's refresh found is told as the daemon tells it.
                print(note, file=sys.stderr, flush=True)
        has_policy = outcome.decision.policy_text is not None
        return _LookedUp(domain, _one_line(outcome.summary), failed, has_policy)


def _refresh(args: argparse.Namespace, settings: Config) -> int:
    domains = _domains(args.domains)
    store = _open(settings, must_exist=False)
    try:
        lookups = _Lookups(settings, store)
        failures = 0
        for domain in domains:
            done = lookups.look_up(domain)
            failures += done.failed
            print(f"{domain}: {'FAILED: ' if done.failed else ''}{done.summary}", flush=True)
    finally:
        _close(store)
    return EXIT_SOME if failures else EXIT_OK


class _Pace:
    """Starts at most ``rate`` lookups per second, evenly spaced, across threads."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


def delivered_domains(lines: Iterable[bytes | None]) -> tuple[list[str], int]:
    """The recipient domains of the deliveries Postfix's SMTP client logged as sent
    (``postfix/smtp[PID]: ... to=<user@DOMAIN>, ... status=sent``), each once, in the order
    of their first delivery; and how many lines were too long to read (None in ``lines``)."""
    domains: dict[str, None] = {}
    too_long = 0
    for line in lines:
        if line is None:
            too_long += 1
            continue
        found = _SMTP_DELIVERY.search(line)
        if found is None:
            continue
        _, at, host = found.group(1).rpartition(b"@")
        if not at:
            continue
        domain = postfix.policy_domain(host.decode("utf-8", "replace"))
        if domain is not None:
            domains[domain] = None
    return list(domains), too_long


def _warm(args: argparse.Namespace, settings: Config) -> int:
    if bool(args.from_maillog) == bool(args.domains):
        raise CommandError("give either --from-maillog FILE or DOMAIN..., not both or neither")
    too_long = 0
    if args.from_maillog:
        try:
            with _input(args.from_maillog) as log_file:
                domains, too_long = delivered_domains(_bounded_lines(log_file, MAX_LOG_LINE))
        except OSError as exc:
            raise CommandError(f"{args.from_maillog}: cannot read: {exc.strerror or exc}") from exc
    else:
        domains = _domains(args.domains)
    store = _open(settings, must_exist=False)
    try:
        lookups = _Lookups(settings, store)
        now = time.time()
        # Held in force: the daemon answers them from the store without a lookup.
        wanted = [
            domain
            for domain in domains
            if not isinstance(
                cache_rules.consult(
                    domain,
                    store.get(domain),
                    None,
                    now,
                    settings.cache,
                    tolerant=settings.tolerant,
                ),
                Answer,
            )
        ]
        results = _look_up_all(lookups, wanted, args.jobs, args.rate)
    finally:
        _close(store)
    failed = sum(r.failed for r in results)
    policies = sum(r.policy for r in results)
    print(
        f"warm: {len(domains)} domain(s), {len(domains) - len(wanted)} already cached,"
        f" {len(results)} looked up: {policies} with a policy, {len(results) - failed - policies}"
        f" without, {failed} failed"
        + (f"; {too_long} log line(s) too long to read, skipped" if too_long else ""),
        flush=True,
    )
    return EXIT_SOME if failed else EXIT_OK


def _look_up_all(lookups: _Lookups, domains: list[str], jobs: int, rate: float) -> list[_LookedUp]:
    """Each domain looked up by ``jobs`` threads, at most ``rate`` started per second; a store
    failure in any of them stops them all and is raised."""
    pending = iter(domains)
    lock = threading.Lock()
    pace = _Pace(rate)
    results: list[_LookedUp] = []
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                if errors:
                    return
                domain = next(pending, None)
            if domain is None:
                return
            pace.wait()
            try:
                done = lookups.look_up(domain)
            except BaseException as exc:  # handed to the main thread, which raises it
                with lock:
                    errors.append(exc)
                return
            with lock:
                results.append(done)
                print(f"{domain}: {'FAILED: ' if done.failed else ''}{done.summary}", flush=True)

    threads = [
        threading.Thread(target=work, name=f"warm-{n}", daemon=True)
        for n in range(min(jobs, len(domains)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------------------------------
# export, import


def entry_to_json(entry: Entry) -> dict[str, Any]:
    """Every field of the entry, by its name (times as Unix timestamps)."""
    return asdict(entry)


class BadLine(ValueError):
    """An import line that cannot become an entry; the message says why."""


def _number(data: dict[str, Any], name: str, *, optional: bool) -> float | None:
    value = data[name]
    if value is None and optional:
        return None
    # bool is an int to Python, not a time to anyone.
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "a number or null" if optional else "a number"
        raise BadLine(f"{name}: expected {kind} (a Unix time), got {_kind(value)}")
    number = float(value)
    if not math.isfinite(number) or not 0 <= number < 1e11:
        raise BadLine(f"{name}: {value!r} is not a Unix time")
    return number


def _text(data: dict[str, Any], name: str, limit: int, *, optional: bool) -> str | None:
    value = data[name]
    if value is None and optional:
        return None
    if not isinstance(value, str):
        kind = "a string or null" if optional else "a string"
        raise BadLine(f"{name}: expected {kind}, got {_kind(value)}")
    if len(value) > limit:
        raise BadLine(f"{name}: {len(value)} characters, more than {limit}")
    return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _reject_constant(name: str) -> NoReturn:
    raise BadLine(f"{name} is not a number JSON allows")


def entry_from_json(line: bytes | str) -> Entry:
    """The entry one line of ``cache export`` holds, checked as the store would need it: a JSON
    object with exactly the entry's fields, a domain as the daemon keys it, a policy text that
    parses and is within MAX_POLICY_TEXT, times as Unix timestamps. Raises BadLine."""
    try:
        data = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, BadLine):
            raise
        raise BadLine(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadLine(f"expected a JSON object, got {_kind(data)}")
    missing = [name for name in _ENTRY_FIELDS if name not in data]
    unknown = sorted(name for name in data if name not in _ENTRY_FIELDS)
    if missing or unknown:
        raise BadLine(
            "; ".join(
                [f"missing {', '.join(missing)}"] * bool(missing)
                + [f"unknown field(s) {', '.join(unknown)[:200]}"] * bool(unknown)
            )
        )
    domain = _text(data, "domain", 253, optional=False)
    assert domain is not None
    if postfix.policy_domain(domain) != domain:
        raise BadLine(
            f"domain: {domain[:80]!r} is not a domain name in lowercase A-labels without a"
            " trailing dot"
        )
    record_id = _text(data, "record_id", 32, optional=True)
    if record_id is not None and not _RECORD_ID.fullmatch(record_id):
        # RFC 8461 §3.1: id is 1*32(ALPHA / DIGIT).
        raise BadLine(f"record_id: {record_id!r} is not an MTA-STS id")
    policy_text = _text(data, "policy_text", MAX_POLICY_TEXT, optional=True)
    expires_at = _number(data, "expires_at", optional=True)
    if policy_text is not None:
        try:
            # Tolerantly: a daemon with [policy] parsing = "tolerant" stored it so. A daemon set
            # to "strict" ignores such an entry when it reads it, and says so in its log.
            mtasts.parse_policy(policy_text, domain, tolerant=True)
        except mtasts.PolicySyntaxError as exc:
            raise BadLine(f"policy_text: not a valid policy: {exc.cause}") from None
        if expires_at is None:
            raise BadLine("expires_at: null, but a policy_text is given (a policy expires)")
    last_used = _number(data, "last_used", optional=False)
    backoff_until = _number(data, "backoff_until", optional=False)
    last_error = _text(data, "last_error", MAX_ERROR_TEXT, optional=False)
    assert last_used is not None and backoff_until is not None and last_error is not None
    return Entry(
        domain=domain,
        record_id=record_id,
        policy_text=policy_text,
        fetched_at=_number(data, "fetched_at", optional=True),
        expires_at=expires_at,
        checked_at=_number(data, "checked_at", optional=True),
        last_used=last_used,
        last_error=last_error,
        backoff_until=backoff_until,
    )


def _export(args: argparse.Namespace, settings: Config) -> int:
    store = _open(settings, must_exist=True)
    try:
        out = sys.stdout
        for entry in store.entries():
            out.write(json.dumps(entry_to_json(entry), ensure_ascii=True) + "\n")
        out.flush()
    finally:
        _close(store)
    return EXIT_OK


def _bounded_lines(stream: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """The lines of ``stream`` (without their line end), None for each line longer than
    ``limit`` bytes, which is skipped without being held in memory."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stream.readline(limit + 1)
            yield None
            continue
        yield line.rstrip(b"\r\n")


@contextlib.contextmanager
def _input(name: str) -> Iterator[IO[bytes]]:
    """A file named on the command line, opened for reading in binary; ``-`` is stdin."""
    if name == "-":
        yield sys.stdin.buffer
        return
    with open(name, "rb") as file:
        yield file


def _import(args: argparse.Namespace, settings: Config) -> int:
    name = "standard input" if args.file == "-" else args.file
    store = _open(settings, must_exist=False)
    imported = bad = 0
    try:
        with _input(args.file) as source:
            for number, line in enumerate(_bounded_lines(source, MAX_IMPORT_LINE), start=1):
                try:
                    if line is None:
                        raise BadLine(f"longer than {MAX_IMPORT_LINE} bytes")
                    if not line.strip():
                        continue
                    entry = entry_from_json(line)
                except BadLine as exc:
                    bad += 1
                    if bad <= MAX_REPORTED_LINES:
                        print(
                            f"{name}: line {number}: skipped: {_one_line(str(exc))}",
                            file=sys.stderr,
                        )
                    continue
                try:
                    store.put(entry)
                except StoreError as exc:
                    failure = _store_failure(settings.cache, exc)
                    raise CommandError(f"{failure} (after {imported} entries imported)") from exc
                imported += 1
    except OSError as exc:
        raise CommandError(
            f"{name}: cannot read: {exc.strerror or exc} ({imported} entries imported before)"
        ) from exc
    finally:
        _close(store)
    if bad > MAX_REPORTED_LINES:
        print(f"{name}: {bad - MAX_REPORTED_LINES} more line(s) skipped", file=sys.stderr)
    print(f"imported {imported} entries" + (f"; skipped {bad} bad line(s)" if bad else ""))
    return EXIT_SOME if bad else EXIT_OK


def _close(store: Store) -> None:
    # What was to be done is done, or has failed with its own message.
    with contextlib.suppress(StoreError):
        store.close()


_COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "list": _list,
    "show": _show,
    "forget": _forget,
    "refresh": _refresh,
    "warm": _warm,
    "export": _export,
    "import": _import,
}
