"""Prometheus metrics: what the daemon holds and does, served over HTTP on ``[metrics] listen``.

The daemon counts as it goes with plain integers in the objects that do the work (the
responder's answers per map name and kind, the policy cache's hits, misses, lookups and
failures, the server's connections and requests), and this module reads them only when
Prometheus scrapes: a custom collector (prometheus-client's ``Collector`` protocol) turns them
into metric families then, so no client-library call is made per answer.

The exporter is prometheus-client's WSGI application on a server of the standard library
(``wsgiref``), bound to its own ``inet:HOST:PORT`` and run in a thread of its own: a scrape never
touches the socketmap listeners or the event loop. The collector reads counters the event loop
writes; it copies each table at once (one step under the interpreter lock) and never iterates
over a live one.

prometheus-client is an optional extra (``postfix-mtasts[metrics]``): this module imports it,
and the daemon imports this module only when ``[metrics] listen`` is set.
"""

from __future__ import annotations

import platform
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from postfix_mtasts import __version__
from postfix_mtasts.listeners import InetListener, parse_listener
from postfix_mtasts.policydb import LOOKUP_SECONDS_BUCKETS, PolicyDB
from postfix_mtasts.responder import ANSWER_KINDS, Responder
from postfix_mtasts.server import Server

__all__ = ["PREFIX", "SERVER_MAP", "Collector", "Exporter", "Sources"]

PREFIX = "postfix_mtasts_"
# The map label of the answers the server gave itself, without the responder.
SERVER_MAP = "(server)"


class Sources(Protocol):
    """Where the counters are: the running daemon's parts (``None`` until the cache is open)."""

    @property
    def db(self) -> PolicyDB | None: ...

    @property
    def responder(self) -> Responder | None: ...

    @property
    def server(self) -> Server: ...


class Collector:
    """Reads the daemon's counters at scrape time into Prometheus metric families."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def describe(self) -> list[Metric]:
        # Without describe() the registry would call collect() when registering, before the
        # daemon's parts exist; the names are checked by the tests instead.
        return []

    def collect(self) -> Iterator[Metric]:
        sources = self._sources
        info = GaugeMetricFamily(
            PREFIX + "build_info",
            "The running version of postfix-mtasts (always 1).",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield from _server_metrics(sources.server)
        responder = sources.responder
        if responder is not None:
            yield _answers(responder, sources.server)
        db = sources.db
        if db is not None:
            yield from _cache_metrics(db)


def _server_metrics(server: Server) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        PREFIX + "open_connections",
        "Socketmap connections open now.",
        value=server.connections,
    )
    counters = (
        ("connections_accepted", server.connections_accepted, "Socketmap connections accepted."),
        ("requests", server.requests, "Socketmap requests read."),
        ("bad_requests", server.bad_requests, "Requests that were not name and key (PERM)."),
        (
            "lookup_timeouts",
            server.lookup_timeouts,
            "Requests answered TEMP because their lookup outlasted server.request_timeout.",
        ),
        (
            "lookup_errors",
            server.lookup_errors,
            "Requests answered TEMP because answering them failed unexpectedly.",
        ),
    )
    for name, value, text in counters:
        yield CounterMetricFamily(PREFIX + name, text, value=value)


def _answers(responder: Responder, server: Server) -> Metric:
    family = CounterMetricFamily(
        PREFIX + "answers",
        'Answers by socketmap name and kind; map="(server)": those the server gave itself.',
        labels=["map", "kind"],
    )
    for name, counts in list(responder.answers.items()):
        for kind, value in zip(ANSWER_KINDS, list(counts), strict=True):
            family.add_metric([name, kind], value)
    # The server answers without the responder a request that is not "name key" (PERM: it has
    # no map name) and one whose lookup failed or outlasted server.request_timeout (TEMP).
    itself = {
        "perm": server.bad_requests,
        "temp": server.lookup_timeouts + server.lookup_errors,
    }
    for kind in ANSWER_KINDS:
        family.add_metric([SERVER_MAP, kind], itself.get(kind, 0))
    return family


def _cache_metrics(db: PolicyDB) -> Iterator[Metric]:
    yield CounterMetricFamily(
        PREFIX + "cache_hits", "Answers taken from memory (unexpired).", value=db.hits
    )
    yield CounterMetricFamily(
        PREFIX + "cache_misses",
        "Lookups of a domain not in memory, or whose answer there had expired.",
        value=db.misses,
    )
    yield CounterMetricFamily(
        PREFIX + "network_lookups",
        "Lookups that asked DNS (and the policy host, when a fetch was due).",
        value=db.network_lookups,
    )
    yield GaugeMetricFamily(
        PREFIX + "lookups_in_flight", "Lookups under way now.", value=db.pending
    )
    yield GaugeMetricFamily(
        PREFIX + "domains_in_memory",
        "Domains held in memory (cache.memory_domains).",
        value=db.size,
    )
    yield GaugeMetricFamily(
        PREFIX + "store_failing",
        "1 while the cache store is failing and avoided (see the log), else 0.",
        value=1 if db.store_failing else 0,
    )
    changes = CounterMetricFamily(
        PREFIX + "policy_changes",
        "Policy changes found by this daemon's fetches (policy-change: log lines), by kind.",
        labels=["kind"],
    )
    for kind, value in sorted(list(db.policy_changes.items())):
        changes.add_metric([kind], value)
    yield changes
    failures = CounterMetricFamily(
        PREFIX + "policy_fetch_failures",
        "Policy fetches that failed, by RFC 8460 result type.",
        labels=["result_type"],
    )
    for result_type, value in sorted(list(db.fetch_failures.items())):
        failures.add_metric([result_type], value)
    yield failures
    yield CounterMetricFamily(
        PREFIX + "dns_failures",
        "MTA-STS TXT record lookups that failed for a DNS reason (not 'no record').",
        value=db.dns_failures,
    )
    durations = HistogramMetricFamily(
        PREFIX + "lookup_duration_seconds",
        "Network lookups by outcome (policy, no-policy, failure), and how long they took.",
        labels=["outcome"],
    )
    sums = dict(list(db.lookup_seconds_sum.items()))
    for outcome, slots in list(db.lookup_seconds.items()):
        counts = list(slots)
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(LOOKUP_SECONDS_BUCKETS, counts, strict=False):
            total += count
            buckets.append((_bound(bound), total))
        buckets.append(("+Inf", sum(counts)))
        durations.add_metric([outcome], buckets, sums.get(outcome, 0.0))
    yield durations


def _bound(seconds: float) -> str:
    return repr(float(seconds))


class _QuietHandler(WSGIRequestHandler):
    """wsgiref's handler without a stderr line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Exporter:
    """The metrics endpoint: prometheus-client's WSGI app, on ``spec`` (``inet:HOST:PORT``),
    served by a thread of its own from :meth:`start` to :meth:`stop`."""

    def __init__(self, spec: str, sources: Sources) -> None:
        self.spec = spec
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(sources))
        # The process' CPU time, memory and descriptors (process_*), as every exporter has them.
        ProcessCollector(registry=self.registry)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (host, port): the port is the one asked for, or the one chosen."""
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve; an `OSError` naming ``metrics.listen`` when it cannot bind."""
        where = f"metrics.listen: cannot listen on {self.spec}"
        listener = parse_listener(self.spec)
        if not isinstance(listener, InetListener):
            raise OSError(f"{where}: expected inet:HOST:PORT")
        try:
            family = socket.getaddrinfo(
                listener.host, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
        except socket.gaierror as exc:
            raise OSError(f"{where}: {exc.strerror}") from exc

        class Server(socketserver.ThreadingMixIn, WSGIServer):
            address_family = family
            # The port may still be in TIME_WAIT after a restart.
            allow_reuse_address = True
            # A scraper that hangs holds its own thread, not the next scrape.
            daemon_threads = True

        try:
            self._httpd = make_server(
                listener.host,
                listener.port,
                make_wsgi_app(self.registry),
                server_class=Server,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise OSError(f"{where}: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None
