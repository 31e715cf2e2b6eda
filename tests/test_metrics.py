"""``[metrics] listen``: a real daemon scraped over HTTP after known traffic against the bed.

The daemon (tests/mtasts_daemon.py) answers socketmap requests for the bed's domains; the test
scrapes its metrics endpoint with urllib before and after, and checks what changed: answers by
map name and kind, cache hits and misses, network lookups and their outcomes, fetch failures by
RFC 8460 result type, open connections. A second daemon with DANE gives the DANE kinds. The
Grafana dashboard in contrib/ is checked against the names a real daemon exports.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bed import DANE_SCENARIOS, Bed, domain_of
from mtasts_daemon import DANE_EXTRA, Daemon, netstring, running_daemon
from prometheus_client.parser import text_string_to_metric_families

from postfix_mtasts import __version__, config

pytest_plugins = ["mtasts_daemon"]

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "contrib" / "grafana-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Scraper:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body: bytes = response.read()
            return body.decode()

    def samples(self) -> Samples:
        found: Samples = {}
        for family in text_string_to_metric_families(self.text()):
            for sample in family.samples:
                found[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def metered(bed: Bed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    port = _free_port()
    settings = {"metrics": {"listen": f"inet:127.0.0.1:{port}"}}
    with running_daemon(bed, tmp_path_factory.mktemp("metrics"), settings=settings) as daemon:
        yield daemon, port


def test_answers_hits_misses_and_lookups_after_known_traffic(
    metered: tuple[Daemon, int],
) -> None:
    daemon, port = metered
    scraper = Scraper(port)
    before = scraper.samples()
    enforce, norecord, testing = domain_of("enforce"), domain_of("norecord"), domain_of("testing")
    traffic = [
        # (map name, key, expected reply prefix)
        ("postfix", enforce, "OK secure"),  # a miss: looked up
        ("postfix", enforce, "OK secure"),  # a hit: the kept reply
        ("postfix", enforce.upper(), "OK secure"),  # a hit, through the key's policy domain
        ("postfix", norecord, "NOTFOUND"),  # a miss
        ("postfix", norecord, "NOTFOUND"),  # a hit
        ("opportunistic", testing, "OK may"),  # a miss
        ("opportunistic", testing, "OK may"),  # a hit
        ("postfix", testing, "NOTFOUND"),  # a hit: the domain is known, the map name is new
        ("postfix", ".parent.example", "NOTFOUND"),  # no policy domain: no lookup at all
    ]
    for name, key, expected in traffic:
        reply = daemon.request(key, name)
        assert reply.startswith(expected), (name, key, reply, daemon.log())
    # A request without a key: the server answers PERM itself.
    with socket.create_connection((daemon.host, daemon.port), timeout=5) as sock:
        sock.sendall(netstring(b"postfix"))
        assert b"PERM" in sock.recv(1000)

    after = scraper.samples()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    answers = "postfix_mtasts_answers_total"
    assert delta(answers, map="postfix", kind="secure") == 3
    assert delta(answers, map="postfix", kind="notfound") == 4
    assert delta(answers, map="opportunistic", kind="other") == 2
    assert delta(answers, map="(server)", kind="perm") == 1
    for kind in ("dane-only", "dane", "temp", "perm"):
        assert delta(answers, map="postfix", kind=kind) == 0
    assert delta("postfix_mtasts_cache_misses_total") == 3
    assert delta("postfix_mtasts_cache_hits_total") == 5
    assert delta("postfix_mtasts_network_lookups_total") == 3
    duration = "postfix_mtasts_lookup_duration_seconds_count"
    assert delta(duration, outcome="policy") == 2  # enforce, testing
    assert delta(duration, outcome="no-policy") == 1  # norecord
    assert delta(duration, outcome="failure") == 0
    assert value(after, "postfix_mtasts_lookups_in_flight") == 0
    assert value(after, "postfix_mtasts_domains_in_memory") >= 3
    assert value(after, "postfix_mtasts_store_failing") == 0
    assert value(after, "postfix_mtasts_build_info", version=__version__, python=_python()) == 1
    assert delta("postfix_mtasts_requests_total") == len(traffic) + 1


def test_fetch_failures_are_counted_by_rfc8460_result_type(metered: tuple[Daemon, int]) -> None:
    daemon, port = metered
    scraper = Scraper(port)
    before = scraper.samples()
    expected = {
        "error500": "sts-policy-fetch-error",
        "untrusted": "sts-webpki-invalid",
        "badpolicy": "sts-policy-invalid",
    }
    for label in expected:
        # No policy could be fetched and none was cached: no MTA-STS (RFC 8461 §3.3).
        assert daemon.request(domain_of(label)).startswith("NOTFOUND"), daemon.log()
    after = scraper.samples()
    failures = "postfix_mtasts_policy_fetch_failures_total"
    for result_type in set(expected.values()):
        got = value(after, failures, result_type=result_type)
        assert got - value(before, failures, result_type=result_type) == 1, result_type
    duration = "postfix_mtasts_lookup_duration_seconds_count"
    assert (
        value(after, duration, outcome="failure") - value(before, duration, outcome="failure") == 3
    )
    # The histogram is cumulative and complete: +Inf holds every lookup of its outcome.
    bucket = "postfix_mtasts_lookup_duration_seconds_bucket"
    assert value(after, bucket, outcome="failure", le="+Inf") == value(
        after, duration, outcome="failure"
    )


def test_open_connections_are_those_held_now(metered: tuple[Daemon, int]) -> None:
    daemon, port = metered
    scraper = Scraper(port)
    held = [socket.create_connection((daemon.host, daemon.port), timeout=5) for _ in range(3)]
    try:
        wait_for(
            lambda: value(scraper.samples(), "postfix_mtasts_open_connections") == 3,
            "3 open connections",
        )
    finally:
        for sock in held:
            sock.close()
    wait_for(
        lambda: value(scraper.samples(), "postfix_mtasts_open_connections") == 0,
        "no open connection",
    )


def test_dane_answers_are_counted_by_kind(bed: Bed, tmp_path: Path) -> None:
    port = _free_port()
    with running_daemon(
        bed,
        tmp_path,
        extra=DANE_EXTRA,
        nameservers=bed.validating_nameservers,
        settings={"metrics": {"listen": f"inet:127.0.0.1:{port}"}},
    ) as daemon:
        for label, reply in (("all-tlsa", "OK dane-only"), ("some-tlsa", "OK dane")):
            for _ in range(2):
                got = daemon.request(DANE_SCENARIOS[label].domain)
                assert got == reply, (label, got, daemon.log())
        assert daemon.request(DANE_SCENARIOS["down"].domain).startswith("TEMP")
        samples = Scraper(port).samples()
    answers = "postfix_mtasts_answers_total"
    assert value(samples, answers, map="postfix", kind="dane-only") == 2
    assert value(samples, answers, map="postfix", kind="dane") == 2
    assert value(samples, answers, map="postfix", kind="temp") == 1


def test_every_dashboard_query_names_exported_metrics(metered: tuple[Daemon, int]) -> None:
    daemon, port = metered
    # Every family, with samples: a fetch failure and a lookup of each outcome happened above or
    # happen here.
    daemon.request(domain_of("enforce"))
    exported = {name for name, _labels in Scraper(port).samples()}
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert queries, "the dashboard has no queries"
    for query in queries:
        names = re.findall(r"\bpostfix_mtasts_[a-zA-Z0-9_:]*", query)
        assert names, f"query names none of our metrics: {query}"
        for name in names:
            assert name in exported, f"{name} (in {query!r}) is not exported"


def test_metrics_port_in_use_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "config.toml"
        path.write_text(
            f'listen = ["inet:127.0.0.1:{_free_port()}"]\n[cache]\nbackend = "memory"\n'
            f'[metrics]\nlisten = "inet:127.0.0.1:{port}"\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "postfix_mtasts", "serve", "-c", str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result
    assert f"metrics.listen: cannot listen on inet:127.0.0.1:{port}" in result.stderr


def test_metrics_listener_must_be_inet_and_not_the_socketmap_port(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    for listen, cause in (
        ("unix:/run/metrics.sock", "expected inet:HOST:PORT"),
        ("inet:127.0.0.1:8461", 'takes the socketmap listener "inet:127.0.0.1:8461"'),
        ("inet:127.0.0.1", "listener 'inet:127.0.0.1'"),
    ):
        path.write_text(f'[metrics]\nlisten = "{listen}"\n')
        with pytest.raises(config.ConfigError) as error:
            config.load(str(path), daemon_files=False)
        assert str(error.value).startswith(f"{path}: metrics.listen: "), error.value
        assert cause in str(error.value)


def test_metrics_without_prometheus_client_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[metrics]\nlisten = "inet:127.0.0.1:9461"\n')
    # check-config in a Python where prometheus_client cannot be imported.
    hide = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from postfix_mtasts.cli import main; sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide, "check-config", "-c", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0, result
    output = result.stdout + result.stderr
    assert f"{path}: metrics.listen: metrics need the prometheus-client package" in output
    assert "pip install 'postfix-mtasts[metrics]'" in output


def _python() -> str:
    import platform

    return platform.python_version()
