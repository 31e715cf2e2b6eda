"""The ``postfix-mtasts`` command: ``serve``, ``query``, ``cache``, ``check-config``, ``health``
and ``doctor``.

Heavy modules (dnspython, requests, asyncio) are imported inside the subcommand that needs them, so
that ``query --socketmap`` and ``--help`` start quickly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from postfix_mtasts import __version__

if TYPE_CHECKING:
    from postfix_mtasts.config import Config
    from postfix_mtasts.dane import DaneResult
    from postfix_mtasts.mtasts import Result
    from postfix_mtasts.resolver import Resolver

# Exit statuses of `query`, in order of severity; several domains exit with the worst.
EXIT_POLICY = 0
EXIT_NO_POLICY = 1
EXIT_TEMPORARY = 2


def _seconds(text: str) -> float:
    """A timeout given on the command line: more than 0, at most 300 seconds (as in the file)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"{text!r}: expected more than 0 and at most 300 seconds")
    return value


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="TOML configuration file (default: /etc/postfix-mtasts/config.toml if it exists)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postfix-mtasts",
        description="MTA-STS (RFC 8461) policy table for Postfix, over the socketmap protocol.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    query = commands.add_parser(
        "query",
        help="look up the MTA-STS policy of domains, or ask a running daemon",
        description=(
            "Look up each DOMAIN directly (DNS and HTTPS, no daemon and no cache) and print the "
            "TXT record, the policy and the answer the daemon would give Postfix. With "
            "--socketmap, send each KEY (or each line of standard input) to a running daemon "
            "instead and print its raw replies. Exit status: 0 a policy was found, 1 no policy, "
            "2 a temporary or usage error; with several domains, the worst. With --socketmap, as "
            "postmap -q: 0 when a key was found (OK), 1 otherwise or on any query error."
        ),
    )
    _add_config_option(query)
    query.add_argument("--json", action="store_true", help="print one JSON object per domain")
    query.add_argument(
        "--map",
        metavar="NAME",
        default="postfix",
        help="the socketmap name whose profile answers (default: postfix)",
    )
    query.add_argument(
        "--socketmap",
        metavar="ENDPOINT",
        help="ask the daemon at ENDPOINT (inet:HOST:PORT or unix:PATH) instead of looking up",
    )
    query.add_argument(
        "--nameserver",
        action="append",
        metavar="HOST[:PORT]",
        help="DNS server to ask (repeatable; overrides dns.nameservers)",
    )
    query.add_argument(
        "--dns-timeout", type=_seconds, metavar="SECONDS", help="per-query DNS timeout (0-300)"
    )
    query.add_argument("--ca-file", metavar="PEM", help="CA certificates for the policy fetch")
    query.add_argument(
        "--https-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="total deadline of the policy fetch (0-300)",
    )
    query.add_argument(
        "--allow-private-addresses",
        action="store_true",
        default=None,
        help="allow policy hosts on loopback and private addresses (for tests)",
    )
    query.add_argument(
        "--dane",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check DANE (TLSA with DNSSEC) before MTA-STS, as the daemon does with "
        "[dane] enabled (default: as configured)",
    )
    query.add_argument(
        "--check-mx",
        action="store_true",
        help="also probe each MX host (EHLO, STARTTLS, certificate, TLSA) and say whether "
        "Postfix would deliver to it with our answer; exit 0 when every MX host would get the "
        "mail, 1 when some would not, 2 on a temporary error (docs/check-mx.md)",
    )
    query.add_argument(
        "--smtp-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="with --check-mx: deadline of the probe of one MX address (0-300, default 30)",
    )
    query.add_argument("keys", nargs="*", metavar="DOMAIN", help="domains (or keys) to look up")
    query.set_defaults(handler=_query)

    serve = commands.add_parser(
        "serve",
        help="run the socketmap daemon",
        description="Answer Postfix's smtp_tls_policy_maps lookups over the socketmap protocol.",
    )
    _add_config_option(serve)
    serve.add_argument(
        "--daemon",
        action="store_true",
        help="detach, write the pid file and drop privileges to server.user/server.group",
    )
    serve.add_argument("--pid-file", metavar="FILE", help="pid file with --daemon")
    serve.set_defaults(handler=_serve)

    _add_cache_parser(commands)

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file and print the effective settings",
    )
    _add_config_option(check)
    check.set_defaults(handler=_check_config)

    health = commands.add_parser(
        "health",
        help="check that a running daemon answers, like a monitoring plugin",
        description=(
            "Ask the running daemon a key it answers without any lookup (a parent-domain probe,"
            f" {HEALTH_KEY!r} under map name {HEALTH_MAP!r}, answered NOTFOUND at once) and print"
            " one line: OK with the time the answer took, or CRITICAL with the endpoint and the"
            " cause (refused, no answer in time, wrong answer). For monitoring systems and"
            " container health checks."
        ),
        epilog=HEALTH_EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_option(health)
    health.add_argument(
        "--socketmap",
        metavar="ENDPOINT",
        help="the daemon to ask, inet:HOST:PORT or unix:PATH (default: the first listener of the"
        f" configuration; {HEALTH_SYSTEMD_ENDPOINT} when that is 'systemd')",
    )
    health.add_argument(
        "--timeout",
        type=_seconds,
        default=HEALTH_TIMEOUT,
        metavar="SECONDS",
        help="for connecting and the answer together (default: %(default)g, at most 300)",
    )
    health.set_defaults(handler=_health)

    doctor = commands.add_parser(
        "doctor",
        help="check that the local Postfix is set up for MTA-STS with this daemon",
        description=(
            "Read Postfix's configuration through postconf and the daemon's, and check what"
            " breaks MTA-STS in practice: smtp_tls_policy_maps names a socketmap table where"
            " the daemon answers (a unix: socket resolved inside the smtp chroot), a test key"
            " answered through it as postmap -q asks it, the CA roots of the secure level,"
            " smtp_tls_security_level, the Postfix version against each map's tlsrpt setting,"
            " and with [dane] enabled smtp_dns_support_level and both resolvers. One line per"
            " check: OK, WARN or FAIL, naming the parameter, file or key and what to change."
        ),
        epilog=DOCTOR_EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_option(doctor)
    doctor.add_argument(
        "--postfix-config",
        metavar="DIR",
        help="Postfix configuration directory, as postconf -c DIR (default: Postfix's own)",
    )
    doctor.add_argument(
        "--key",
        metavar="KEY",
        help="the key asked through each socketmap table (default: a parent-domain probe the"
        " daemon answers NOTFOUND without a lookup; give a domain with an MTA-STS policy to"
        " check a real answer)",
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(handler=_doctor)
    return parser


DOCTOR_EXIT_STATUSES = """exit status:
  0  no check failed (warnings may have been printed)
  1  at least one check failed (a FAIL line)
  2  nothing could be checked: postconf not found or failing (a bad --postfix-config),
     the daemon's configuration unreadable, or a usage error
"""


# `health`: the probe, a key every daemon answers NOTFOUND without a lookup (a parent-domain
# probe: responder.py answers keys that are no policy domain at once).
HEALTH_MAP = "postfix"
HEALTH_KEY = ".health.invalid"
HEALTH_ANSWER = "NOTFOUND "
HEALTH_TIMEOUT = 5.0
# Where a daemon whose listener is `systemd` is asked: the address of contrib/postfix-mtasts.socket
# (and the daemon's default listener), since the sockets systemd holds are not in the file.
HEALTH_SYSTEMD_ENDPOINT = "inet:127.0.0.1:8461"
# Replies and errors are shown this long at most.
HEALTH_SHOWN = 80

HEALTH_EXIT_STATUSES = """exit status:
  0  OK: the daemon answered the probe correctly within the timeout
  1  CRITICAL: the connection failed (refused, no such socket), no answer came in
     time, the answer was wrong, or the configuration could not be read
  2  usage error (a bad option)
"""


# `cache warm`: lookups at once, and lookups started per second. (Here, with the options, so
# that building the parser imports no lookup machinery.)
WARM_JOBS = 4
WARM_RATE = 10.0
MAX_WARM_JOBS = 64
MAX_WARM_RATE = 1000.0

CACHE_EXIT_STATUSES = """\
exit status (every subcommand):
  0  done
  1  show: the cache does not hold the domain; refresh, warm: a lookup failed;
     import: a line was bad (and skipped)
  2  usage or configuration error, a file that cannot be read, or the store cannot
     be opened or reached (one line on standard error names the store and the cause)
"""


def _positive(kind: type[int] | type[float], top: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value <= top:
            raise argparse.ArgumentTypeError(f"{text!r}: expected more than 0 and at most {top:g}")
        return value

    return convert


def _add_cache_parser(commands: Any) -> None:
    cache = commands.add_parser(
        "cache",
        help="list, show, forget, refresh, export, import or warm the policy cache",
        description=(
            "Work on the policy cache the configuration names ([cache] backend: sqlite, redis or"
            ' postgresql), beside any daemon sharing it. A cache with backend = "memory" lives'
            " in the daemon only: there is nothing for these commands to work on."
        ),
        epilog=CACHE_EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_option(cache)
    subcommands = cache.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", required=True)

    def subcommand(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subcommands.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=CACHE_EXIT_STATUSES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # -c after the subcommand too; SUPPRESS keeps a -c given before it.
        parser.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="TOML configuration file (default: /etc/postfix-mtasts/config.toml if it exists)",
        )
        return parser

    listing = subcommand(
        "list",
        "one line per cached domain",
        "One line per cached domain, ordered by name, after a header line: DOMAIN MODE FETCHED"
        " EXPIRES LAST-USED MX LAST-ERROR, separated by spaces (MX patterns joined by commas,"
        " the error last and free text; '-' for nothing; times in UTC, ISO 8601).",
    )
    listing.add_argument(
        "--json",
        action="store_true",
        help="JSON lines: one JSON object per domain and line (no enclosing array)",
    )
    show = subcommand(
        "show",
        "everything the cache holds about one domain, and each map's answer now",
        "Every field of the domain's entry, its policy parsed, and the answer each configured"
        " map (postfix: [policy]; and every [maps.NAME]) would give now, built as the daemon"
        " builds it.",
    )
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.add_argument("domain", metavar="DOMAIN")
    forget = subcommand(
        "forget",
        "remove domains from the cache",
        "Remove the entries of the DOMAINs; daemons sharing the store drop them too.",
    )
    forget.add_argument("domains", nargs="+", metavar="DOMAIN")
    refresh = subcommand(
        "refresh",
        "look domains up and fetch their policies now",
        "Look up each DOMAIN's TXT record and fetch its policy now, whatever the cache says,"
        " and store the result; a failure keeps a cached policy (RFC 8461 §5). One line per"
        " domain.",
    )
    refresh.add_argument("domains", nargs="+", metavar="DOMAIN")
    subcommand(
        "export",
        "write every entry as JSON lines",
        "Write every entry to standard output, one JSON object per line with every field"
        " (times as Unix timestamps), ordered by domain: what import reads.",
    )
    importing = subcommand(
        "import",
        "store the entries of an export",
        "Read JSON lines as export writes them from FILE ('-': standard input), check each"
        " line and store the good ones (replacing entries of the same domains); a bad line is"
        " reported on standard error with its number and skipped.",
    )
    importing.add_argument("file", metavar="FILE")
    warm = subcommand(
        "warm",
        "look up the domains mail was delivered to",
        "Look up the DOMAINs, or the recipient domains of the deliveries a Postfix mail log"
        " shows (postfix/smtp lines with status=sent), that the cache does not hold in force"
        " already, like refresh, with bounded concurrency and rate; then print a summary.",
    )
    warm.add_argument(
        "--from-maillog", metavar="FILE", help="Postfix's mail log ('-': standard input)"
    )
    warm.add_argument(
        "--jobs",
        type=_positive(int, MAX_WARM_JOBS),
        default=WARM_JOBS,
        metavar="N",
        help=f"lookups at once (default: {WARM_JOBS}, at most {MAX_WARM_JOBS})",
    )
    warm.add_argument(
        "--rate",
        type=_positive(float, MAX_WARM_RATE),
        default=WARM_RATE,
        metavar="PER_SECOND",
        help=f"lookups started per second (default: {WARM_RATE:g}, at most {MAX_WARM_RATE:g})",
    )
    warm.add_argument("domains", nargs="*", metavar="DOMAIN")
    cache.set_defaults(handler=_cache)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Any = args.handler
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return 130


def _load_config(args: argparse.Namespace, *, daemon_files: bool = True) -> Config | None:
    from postfix_mtasts import config

    try:
        return config.load(args.config, daemon_files=daemon_files)
    except config.ConfigError as exc:
        print(f"postfix-mtasts: {exc}", file=sys.stderr)
        return None


# --------------------------------------------------------------------------------------------------
# check-config


def _check_config(args: argparse.Namespace) -> int:
    from postfix_mtasts import config

    settings = _load_config(args)
    if settings is None:
        return 2
    sys.stdout.write(config.dump(settings))
    return 0


# --------------------------------------------------------------------------------------------------
# serve


def _serve(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    if settings is None:
        return 2
    from postfix_mtasts import service

    return service.run(
        settings, config_path=args.config, detach=args.daemon, pid_file=args.pid_file
    )


# --------------------------------------------------------------------------------------------------
# health


def _health(args: argparse.Namespace) -> int:
    import time

    from postfix_mtasts import client

    endpoint: str = args.socketmap or ""
    if not endpoint:
        from postfix_mtasts import config

        try:
            settings = config.load(args.config, daemon_files=False)
        except config.ConfigError as exc:
            print(f"CRITICAL: cannot tell where postfix-mtasts listens: {_shown(str(exc))}")
            return 1
        endpoint = settings.listen[0]
        if endpoint == "systemd":
            endpoint = HEALTH_SYSTEMD_ENDPOINT
    where = f"postfix-mtasts at {endpoint}"
    started = time.monotonic()
    deadline = started + args.timeout
    try:
        asking = client.Client(endpoint, args.timeout)
        try:
            reply = asking.request(HEALTH_MAP, HEALTH_KEY, deadline=deadline)
        finally:
            asking.close()
    except client.ClientError as exc:
        print(f"CRITICAL: {where}: {_health_cause(exc, endpoint, args.timeout)}")
        return 1
    took = time.monotonic() - started
    if reply != HEALTH_ANSWER:
        print(
            f"CRITICAL: {where}: wrong answer to {HEALTH_KEY}: {_shown(reply)}"
            f" (expected {HEALTH_ANSWER!r})"
        )
        return 1
    # Rounded up: "0 ms" would read as no answer at all.
    print(f"OK: {where} answered in {max(1, math.ceil(took * 1000))} ms")
    return 0


def _health_cause(exc: Exception, endpoint: str, timeout: float) -> str:
    cause = exc.__cause__
    if isinstance(cause, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (is the daemon running?)"
    if isinstance(cause, FileNotFoundError):
        return "no such socket (is the daemon running?)"
    # The line names the endpoint already.
    return _shown(str(exc).removeprefix(f"{endpoint}: "))


def _shown(text: str) -> str:
    """``text`` fit for one line of a monitoring system (:func:`client.one_line`)."""
    from postfix_mtasts import client

    return client.one_line(text, HEALTH_SHOWN)


# --------------------------------------------------------------------------------------------------
# doctor


def _doctor(args: argparse.Namespace) -> int:
    from postfix_mtasts import config, doctor

    try:
        settings = config.load(args.config, daemon_files=False)
        postconf = doctor.Postconf(args.postfix_config)
        findings = doctor.diagnose(
            settings,
            postconf,
            config_name=_config_name(args.config),
            key=args.key or doctor.DEFAULT_KEY,
        )
    except (config.ConfigError, doctor.DoctorError) as exc:
        print(f"postfix-mtasts doctor: {exc}", file=sys.stderr)
        return doctor.EXIT_TROUBLE
    status = doctor.exit_status(findings)
    if args.json:
        report = {
            "findings": [
                {"status": str(f.status), "subject": f.subject, "message": f.message}
                for f in findings
            ],
            "exit_status": status,
        }
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(doctor.render(findings))
    return status


def _config_name(path: str | None) -> str:
    """The daemon's configuration as a report names it."""
    import os

    from postfix_mtasts import config

    if path is not None:
        return path
    return config.DEFAULT_PATH if os.path.exists(config.DEFAULT_PATH) else "(built-in defaults)"


# --------------------------------------------------------------------------------------------------
# cache


def _cache(args: argparse.Namespace) -> int:
    from postfix_mtasts import cachecmd

    # The cache commands open the store themselves, not the daemon's log file.
    settings = _load_config(args, daemon_files=False)
    if settings is None:
        return cachecmd.EXIT_TROUBLE
    return cachecmd.run(args, settings)


# --------------------------------------------------------------------------------------------------
# query


def _query(args: argparse.Namespace) -> int:
    if args.socketmap:
        return _query_socketmap(args)
    if not args.keys:
        print("postfix-mtasts query: give at least one DOMAIN (or --socketmap)", file=sys.stderr)
        return EXIT_TEMPORARY
    # The query tool opens neither the daemon's log file nor its cache.
    settings = _load_config(args, daemon_files=False)
    if settings is None:
        return EXIT_TEMPORARY

    from dataclasses import replace

    from postfix_mtasts import dane, mtasts, postfix, service
    from postfix_mtasts.resolver import LocalError

    # The command line's options over the configuration's, then the daemon's own wiring.
    dns, https = settings.dns, settings.https
    if args.nameserver:
        dns = replace(dns, nameservers=tuple(args.nameserver))
    if args.dns_timeout is not None:
        dns = replace(dns, timeout=args.dns_timeout, lifetime=args.dns_timeout * 2)
    if args.ca_file:
        https = replace(https, ca_file=args.ca_file)
    if args.https_timeout is not None:
        https = replace(
            https,
            timeout=args.https_timeout,
            connect_timeout=min(https.connect_timeout, args.https_timeout),
        )
    if args.allow_private_addresses is not None:
        https = replace(https, allow_private_addresses=args.allow_private_addresses)
    settings = replace(settings, dns=dns, https=https)
    try:
        resolver = service.make_resolver(settings)
        fetcher = service.make_fetcher(settings, resolver)
    except ValueError as exc:
        print(f"postfix-mtasts query: {exc}", file=sys.stderr)
        return EXIT_TEMPORARY
    profile = settings.profile(args.map)
    use_dane = settings.dane.enabled if args.dane is None else args.dane
    worst = EXIT_POLICY
    for key in args.keys:
        domain = postfix.policy_domain(key)
        if domain is None:
            # Keys the daemon answers at once without a lookup ([host], .parent, IP addresses).
            status = _print_key_without_policy(key, postfix.NOTFOUND, args.json)
        else:
            try:
                verdict = dane.evaluate(domain, resolver) if use_dane else None
                result = mtasts.get(domain, resolver, fetcher, tolerant=settings.tolerant)
            except LocalError as exc:
                # This machine, not the domain, failed the lookup: nothing to say about it.
                print(f"postfix-mtasts query: {domain}: {exc}", file=sys.stderr)
                worst = max(worst, EXIT_TEMPORARY)
                continue
            answer = (verdict and postfix.dane_reply(verdict)) or postfix.policy_reply(
                result.policy, profile, domain, result.policy_text
            )
            if args.check_mx:
                status = _check_mx(args, settings, resolver, domain, answer, result, verdict)
            else:
                status = _print_result(domain, result, answer, verdict, args.json)
        worst = max(worst, status)
    return worst


def _check_mx(
    args: argparse.Namespace,
    settings: Config,
    resolver: Resolver,
    domain: str,
    answer: str,
    result: Result,
    verdict: DaneResult | None,
) -> int:
    from postfix_mtasts import checkmx

    check = checkmx.check_domain(
        domain,
        resolver,
        answer=answer,
        policy=result.policy,
        dane_verdict=verdict,
        ca_file=settings.https.ca_file,
        allow_private_addresses=settings.https.allow_private_addresses,
        timeout=args.smtp_timeout or checkmx.DEFAULT_TIMEOUT,
    )
    if not args.json:
        # What `query` prints, then the hosts; with --json the check's object says it all.
        _print_result(domain, result, answer, verdict, as_json=False)
    return checkmx.report(check, args.json)


def _print_key_without_policy(key: str, answer: str, as_json: bool) -> int:
    reason = "no MTA-STS policy applies to this key (not a policy domain)"
    if as_json:
        print(json.dumps({"domain": None, "key": key, "error": None, "postfix_answer": answer}))
    else:
        print(f"{key}: {reason}\n  postfix answer: {answer}")
    return EXIT_NO_POLICY


def _result_status(result: Result, verdict: DaneResult | None) -> int:
    from postfix_mtasts.dane import DaneState
    from postfix_mtasts.mtasts import DNSError

    if verdict is not None and verdict.state is not DaneState.NONE:
        if verdict.state is DaneState.TEMP:
            return EXIT_TEMPORARY
        return EXIT_NO_POLICY if verdict.state is DaneState.NULL_MX else EXIT_POLICY
    if result.policy is not None:
        return EXIT_POLICY
    if isinstance(result.error, DNSError):
        return EXIT_TEMPORARY
    return EXIT_NO_POLICY


def _print_result(
    domain: str, result: Result, answer: str, verdict: DaneResult | None, as_json: bool
) -> int:
    from postfix_mtasts import mtasts

    status = _result_status(result, verdict)
    if as_json:
        record = result.record
        policy = result.policy
        error = result.error
        print(
            json.dumps(
                {
                    "domain": domain,
                    "record": None
                    if record is None
                    else {
                        "version": record.version,
                        "id": record.id,
                        "extensions": [list(e) for e in record.extensions],
                    },
                    "record_text": result.record_text,
                    "policy": None
                    if policy is None
                    else {
                        "version": policy.version,
                        "mode": policy.mode.value,
                        "mx": [str(mx) for mx in policy.mx],
                        "max_age": policy.max_age,
                        "extensions": [list(e) for e in policy.extensions],
                    },
                    "policy_text": result.policy_text,
                    # What the tolerant reading accepted, for the domain's postmaster to fix.
                    "policy_defects": []
                    if policy is None
                    else [mtasts.printable_defects((d,)) for d in policy.defects],
                    "error": None
                    if error is None
                    else {"type": type(error).__name__, "message": str(error)},
                    "tls_report_failure": ""
                    if error is None
                    else mtasts.tls_report_failure_reason(error),
                    "dane": None
                    if verdict is None
                    else {
                        "state": verdict.state.value,
                        "reason": verdict.reason,
                        "hosts": [
                            {"host": h.host, "state": h.state, "detail": h.detail}
                            for h in verdict.hosts
                        ],
                    },
                    "postfix_answer": answer,
                }
            )
        )
        return status

    lines: list[str] = []
    if verdict is not None:
        lines.append(f"{domain}: DANE {verdict.state} ({verdict.reason})")
        lines.extend(
            f"  {h.host}: {h.state}" + (f" ({h.detail})" if h.detail else "") for h in verdict.hosts
        )
    if result.policy is not None and result.record is not None:
        policy = result.policy
        record_id = result.record.id
        lines.append(f"{domain}: {policy.mode} policy (id {record_id}, max_age {policy.max_age})")
        if policy.defects:
            defects = mtasts.printable_defects(policy.defects)
            lines.append(f"  policy defects (tolerated; the domain should fix them): {defects}")
    elif result.record is not None:
        lines.append(f"{domain}: MTA-STS record found, but no usable policy")
    if result.record_text is not None:
        lines.append(f"  record: {result.record_text}")
    if result.policy_text is not None:
        lines.append(f"  policy ({mtasts.policy_url(domain)}):")
        lines.extend(f"    {line}" for line in result.policy_text.splitlines())
    if lines:
        lines.append(f"  postfix answer: {answer}")
        print("\n".join(lines))
    if result.error is not None:
        print(str(result.error), file=sys.stderr)
    return status


def _query_socketmap(args: argparse.Namespace) -> int:
    from postfix_mtasts import client

    keys: Iterable[str] = args.keys or (line.rstrip("\r\n") for line in sys.stdin)
    return client.run(args.socketmap, args.map, keys)
