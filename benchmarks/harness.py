"""Side-by-side benchmark: postfix-mtasts against postfix-mta-sts-resolver 1.5.1 (issue 5).

Run it with ``benchmarks/run`` (as root: the bed's HTTPS server listens on port 443 and the peer
gets its resolv.conf in a private mount namespace). It starts the test suite's real DNS and HTTPS
servers on loopback (tests/bed.py), publishes the benchmark's test domains, runs both daemons with
equivalent settings (benchmarks/daemons.py), drives them with a socketmap load generator written
in C (benchmarks/loadgen.c), and prints one table: ours, the peer, the ratio, the target and
whether it holds. Exit status 1 when a target is missed, 2 when the harness itself failed.

Every figure is the median over several rounds. Every load is bounded in requests and time and
targets only loopback; every process started here is stopped at the end.

The measurements (issue 5):
  1. cached answers over 1, 50 and 200 connections: answers/s, daemon CPU µs per answer, p50, p99;
  2. cold fan-out: 500 uncached domains over 100 connections, policy host answering after 200 ms;
  3. stampede: 200 concurrent requests for one uncached domain: TXT queries and HTTPS GETs;
  4. slow neighbour: cached p99 while 50 connections wait on policy hosts that hang;
  5. scale: 100000 domains in the SQLite cache: RSS, file size, cached answers/s against 100;
  6. start-up: ``serve`` ready to answer, ``query --socketmap`` answering.
and for a fleet sharing one cache (issue 12), on a Redis and a PostgreSQL server started for the
run (tests/dbservers.py) only when one of these runs:
  7. cached answers over 50 connections with the Redis and the PostgreSQL cache of each daemon;
  8. fleet stampede: 3 daemons on one store, their clients asking the same 10 new domains at once
     (60 connections per daemon, policy hosts answering after 200 ms): HTTPS GETs and TXT queries
     per domain, wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bedtools  # noqa: E402
import daemons  # noqa: E402
import loadgen  # noqa: E402
from bedtools import Bed  # noqa: E402
from daemons import Daemon, SharedStore  # noqa: E402

REPO = HERE.parent
# The checkout's own package first (fill_ours, the store checks), as for the daemon it starts.
sys.path.insert(1, str(REPO))
README = HERE / "README.md"
RESULTS_DIR = HERE / ".results"
KINDS = ("ours", "peer")
CACHES = ("memory", "sqlite")
# The shared caches of measurements 7 and 8, by ours' name for them (cache.backend).
SHARED = ("redis", "postgresql")
ALL_MEASUREMENTS = frozenset(range(1, 9))

# Sizes of the measurements, as the issue states them.
CACHED_DOMAINS = 100
CACHED_CONNS = (1, 50, 200)
HEADLINE_CONNS = 50
FANOUT_DOMAINS = 500
FANOUT_CONNS = 100
FANOUT_DELAY = 0.2
FANOUT_LIMIT = 2.0
STAMPEDE_CONNS = 200
STAMPEDE_DELAY = 0.2
HANG_CONNS = 50
# Rounds under the hanging hosts: 3 x (0.3 + 1.5) s fit in the daemons' 10 s fetch timeout.
HANG_ROUNDS = 3
SCALE_DOMAINS = 100_000
SCALE_BASE = 100
SCALE_CONNS = 50
# Issue 11: the hot path keeps little per domain (framed replies and a few timestamps).
RSS_LIMIT_MB = 100.0
STARTUP_LIMIT_S = 0.300
# The fleet stampede: every daemon's clients send their requests at once, one per connection.
FLEET_DAEMONS = 3
FLEET_DOMAINS = 10
FLEET_CONNS = 60
FLEET_DELAY = 0.2
# How long a daemon may take to write what it learned to a shared store (it may write behind).
STORED_WITHIN = 10.0


@dataclass
class Settings:
    rounds: int = 5
    duration: float = 2.0
    warmup: float = 0.5
    startup_rounds: int = 7
    only: frozenset[int] = ALL_MEASUREMENTS
    # [metrics] on for our daemons (--metrics): the hot path measured as a scraped daemon runs.
    metrics: bool = False
    # The whole run's bound: a full run's usual length (benchmarks/README.md), with room for a
    # busy machine.
    budget: float = 1200.0


@dataclass
class Row:
    """One line of the table."""

    section: str
    metric: str
    ours: float | None
    peer: float | None
    fmt: str = "{:.0f}"
    target: str = ""
    holds: bool | None = None
    note: str = ""

    def ratio(self) -> float | None:
        if self.ours is None or self.peer is None or not self.peer:
            return None
        if math.isnan(self.ours) or math.isnan(self.peer):
            return None
        return self.ours / self.peer


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        mark = {True: "holds", False: "MISSED", None: ""}[row.holds]
        print(
            f"  {row.section} | {row.metric}: ours {_fmt(row.fmt, row.ours)}, "
            f"peer {_fmt(row.fmt, row.peer)} {mark}",
            flush=True,
        )
        return row


def _fmt(fmt: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else float("nan")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The run.


class Bench:
    def __init__(self, settings: Settings, workdir: Path, peer_venv: Path) -> None:
        self.s = settings
        self.workdir = workdir
        self.report = Report()
        self.deadline = time.monotonic() + settings.budget
        say("building the load generator (gcc)")
        self.load = loadgen.LoadGen(loadgen.build(), workdir / "loadgen")
        daemons.compile_ours()
        say("checking the peer's venv (postfix-mta-sts-resolver 1.5.1)")
        self.peer_daemon = daemons.ensure_peer(peer_venv)
        say("starting the test bed (knot, unbound, HTTPS on port 443)")
        self.bed: Bed = bedtools.start_bed(workdir / "bed")
        self._running: list[Daemon] = []
        self._servers: SharedServers | None = None
        self._counter = 0
        self.cached_labels = [f"bc{i:03d}" for i in range(CACHED_DOMAINS)]
        self.cached_keys = [bedtools.domain(label) for label in self.cached_labels]
        self.fanout_labels = [f"bf{i:03d}" for i in range(FANOUT_DOMAINS)]
        self._publish()

    def _publish(self) -> None:
        started = time.monotonic()
        pairs = [(label, bedtools.policy_response(label)) for label in self.cached_labels]
        pairs += [
            (label, bedtools.policy_response(label, delay=FANOUT_DELAY))
            for label in self.fanout_labels
        ]
        for kind in KINDS:
            for cache in CACHES:
                for r in range(self.s.rounds):
                    label = f"bs-{kind}-{cache}-{r}"
                    pairs.append((label, bedtools.policy_response(label, delay=STAMPEDE_DELAY)))
                for i in range(HANG_CONNS):
                    label = f"bh-{kind}-{cache}-{i}"
                    pairs.append((label, bedtools.policy_response(label, hang=True)))
            for backend in SHARED:
                for r in range(self.s.rounds):
                    for label in self._fleet_labels(kind, backend, r):
                        pairs.append((label, bedtools.policy_response(label, delay=FLEET_DELAY)))
        bedtools.publish(self.bed, pairs)
        say(f"published {len(pairs)} test domains in {time.monotonic() - started:.1f}s")

    @staticmethod
    def _fleet_labels(kind: str, backend: str, round_: int) -> list[str]:
        return [f"bfl-{kind}-{backend}-{round_}-{i}" for i in range(FLEET_DOMAINS)]

    def close(self) -> None:
        for daemon in self._running:
            daemon.stop()
        self._running.clear()
        try:
            self.bed.stop()
        finally:
            if self._servers is not None:
                self._servers.close()

    def servers(self) -> SharedServers:
        """The Redis and PostgreSQL servers, started on first use (once per run)."""
        if self._servers is None:
            say("starting redis-server and PostgreSQL (tests/dbservers.py)")
            self._servers = SharedServers()
        return self._servers

    # helpers ------------------------------------------------------------------------------------

    def check_budget(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"the run's time budget of {self.s.budget:.0f}s is spent")

    def _dir(self, name: str) -> Path:
        self._counter += 1
        return self.workdir / "daemons" / f"{self._counter:03d}-{name}"

    def start(
        self,
        kind: str,
        cache: str,
        cache_path: Path | None = None,
        store: SharedStore | None = None,
    ) -> Daemon:
        self.check_budget()
        daemon = daemons.start(
            kind,
            self.bed,
            self.peer_daemon,
            self._dir(f"{kind}-{cache}"),
            cache,
            cache_path,
            store=store,
            metrics=self.s.metrics,
        )
        self._running.append(daemon)
        return daemon

    def stop(self, daemon: Daemon) -> None:
        daemon.stop()
        if daemon in self._running:
            self._running.remove(daemon)

    @contextmanager
    def running(self, kind: str, cache: str, cache_path: Path | None = None) -> Iterator[Daemon]:
        daemon = self.start(kind, cache, cache_path)
        try:
            yield daemon
        finally:
            self.stop(daemon)

    def warm(self, daemon: Daemon, keys: Sequence[str], conns: int = 10) -> loadgen.Result:
        """Ask every key once (first lookups); every answer must be OK."""
        result = self.load.run(daemon.port, keys, conns=conns, once=True, timeout=120)
        if result.ok != len(keys):
            raise RuntimeError(
                f"{daemon.kind}/{daemon.cache}: warming {len(keys)} domains gave {result.ok} OK "
                f"answers ({result}); its log:\n{daemon.log()}"
            )
        return result

    def timed(self, daemon: Daemon, keys: Sequence[str], conns: int) -> loadgen.Result:
        self.check_budget()
        result = self.load.run(
            daemon.port,
            keys,
            conns=conns,
            duration=self.s.duration,
            warmup=self.s.warmup,
            pid=daemon.pid,
            timeout=self.s.duration + self.s.warmup + 30,
        )
        if result.ok != result.answered or result.errors or result.connect_failures:
            raise RuntimeError(
                f"{daemon.kind}/{daemon.cache}: cached round gave wrong answers or errors: "
                f"{result}; its log:\n{daemon.log()}"
            )
        return result

    # 1. cached answers --------------------------------------------------------------------------

    def cached(self) -> None:
        say("1. cached answers")
        for cache in CACHES:
            ours = self.start("ours", cache)
            peer = self.start("peer", cache)
            try:
                for daemon in (ours, peer):
                    self.warm(daemon, self.cached_keys)
                for conns in CACHED_CONNS:
                    runs: dict[str, list[loadgen.Result]] = {k: [] for k in KINDS}
                    for _ in range(self.s.rounds):
                        # Alternate the daemons round by round, so drift hits both alike.
                        for daemon in (ours, peer):
                            runs[daemon.kind].append(self.timed(daemon, self.cached_keys, conns))
                    self._cached_rows(1, cache, conns, runs)
            finally:
                self.stop(ours)
                self.stop(peer)

    def _cached_rows(
        self, number: int, cache: str, conns: int, runs: dict[str, list[loadgen.Result]]
    ) -> None:
        section = f"{number}. cached, {cache}, {conns} conn{'s' if conns > 1 else ''}"
        rps = {k: median([r.rps for r in runs[k]]) for k in KINDS}
        cpu = {k: median([r.cpu_us_per_request for r in runs[k]]) for k in KINDS}
        p50 = {k: median([r.p50_us / 1000 for r in runs[k]]) for k in KINDS}
        p99 = {k: median([r.p99_us / 1000 for r in runs[k]]) for k in KINDS}
        lg = median([r.loadgen_cpu_us_per_request for k in KINDS for r in runs[k]])
        self.report.details[f"cached-{cache}-{conns}"] = {
            k: [asdict(r) for r in runs[k]] for k in KINDS
        }
        headline = conns == HEADLINE_CONNS
        row = Row(section, "answers/s", rps["ours"], rps["peer"], note=f"loadgen {lg:.1f} µs/req")
        if headline:
            row.target = "≥ 2.5x peer"
            row.holds = (row.ratio() or 0) >= 2.5
        self.report.add(row)
        row = Row(section, "daemon CPU µs/answer", cpu["ours"], cpu["peer"], fmt="{:.1f}")
        if headline:
            row.target = "≤ 0.4x peer"
            ratio = row.ratio()
            row.holds = ratio is not None and ratio <= 0.4
        self.report.add(row)
        self.report.add(Row(section, "p50 latency ms", p50["ours"], p50["peer"], fmt="{:.2f}"))
        row = Row(section, "p99 latency ms", p99["ours"], p99["peer"], fmt="{:.2f}")
        if headline:
            row.target = "≤ peer"
            row.holds = p99["ours"] <= p99["peer"]
        self.report.add(row)

    # 2. cold fan-out ----------------------------------------------------------------------------

    def fanout(self) -> None:
        say("2. cold fan-out")
        keys = [bedtools.domain(label) for label in self.fanout_labels]
        for cache in CACHES:
            walls: dict[str, list[float]] = {k: [] for k in KINDS}
            cpus: dict[str, list[float]] = {k: [] for k in KINDS}
            oks: dict[str, list[int]] = {k: [] for k in KINDS}
            for r in range(self.s.rounds):
                for kind in KINDS:
                    # A fresh daemon with an empty cache each round: every domain is uncached.
                    with self.running(kind, cache) as daemon:
                        result = self.load.run(
                            daemon.port,
                            keys,
                            conns=FANOUT_CONNS,
                            once=True,
                            timeout=60,
                            pid=daemon.pid,
                        )
                    walls[kind].append(result.elapsed)
                    cpus[kind].append(result.daemon_cpu_s / FANOUT_DOMAINS * 1000)
                    oks[kind].append(result.ok)
                    self.report.details[f"fanout-{cache}-{kind}-{r}"] = asdict(result)
            section = f"2. cold fan-out, {cache}"
            wall = {k: median(walls[k]) for k in KINDS}
            all_ok = all(ok == FANOUT_DOMAINS for ok in oks["ours"])
            self.report.add(
                Row(
                    section,
                    f"wall s, {FANOUT_DOMAINS} domains",
                    wall["ours"],
                    wall["peer"],
                    fmt="{:.2f}",
                    target=f"< {FANOUT_LIMIT:g} s, all OK",
                    holds=wall["ours"] < FANOUT_LIMIT and all_ok,
                )
            )
            self.report.add(
                Row(
                    section,
                    "daemon CPU ms per cold lookup",
                    median(cpus["ours"]),
                    median(cpus["peer"]),
                    fmt="{:.2f}",
                )
            )
            self.report.add(
                Row(
                    section,
                    "OK answers (min of rounds)",
                    float(min(oks["ours"])),
                    float(min(oks["peer"])),
                )
            )

    # 3. stampede --------------------------------------------------------------------------------

    def stampede(self) -> None:
        say("3. stampede")
        for cache in CACHES:
            txt: dict[str, list[int]] = {k: [] for k in KINDS}
            gets: dict[str, list[int]] = {k: [] for k in KINDS}
            oks: dict[str, list[int]] = {k: [] for k in KINDS}
            for kind in KINDS:
                with self.running(kind, cache) as daemon:
                    for r in range(self.s.rounds):
                        self.check_budget()
                        name = bedtools.domain(f"bs-{kind}-{cache}-{r}")
                        result = self.load.run(
                            daemon.port,
                            [name] * STAMPEDE_CONNS,
                            conns=STAMPEDE_CONNS,
                            once=True,
                            timeout=60,
                        )
                        counts = bedtools.txt_queries(self.bed, [name])
                        txt[kind].append(counts[name])
                        gets[kind].append(self.bed.https.request_count(f"mta-sts.{name}"))
                        oks[kind].append(result.ok)
                        self.report.details[f"stampede-{cache}-{kind}-{r}"] = {
                            "result": asdict(result),
                            "txt_queries": counts[name],
                            "https_gets": gets[kind][-1],
                        }
            section = f"3. stampede, {cache}"
            all_ok = all(ok == STAMPEDE_CONNS for ok in oks["ours"])
            self.report.add(
                Row(
                    section,
                    f"TXT queries per {STAMPEDE_CONNS} requests (max of rounds)",
                    float(max(txt["ours"])),
                    float(max(txt["peer"])),
                    target="exactly 1",
                    holds=all(n == 1 for n in txt["ours"]) and all_ok,
                )
            )
            self.report.add(
                Row(
                    section,
                    f"HTTPS GETs per {STAMPEDE_CONNS} requests (max of rounds)",
                    float(max(gets["ours"])),
                    float(max(gets["peer"])),
                    target="exactly 1",
                    holds=all(n == 1 for n in gets["ours"]) and all_ok,
                )
            )

    # 4. slow neighbour --------------------------------------------------------------------------

    def slow_neighbour(self) -> None:
        say("4. slow neighbour")
        for cache in CACHES:
            quiet: dict[str, float] = {}
            busy: dict[str, float] = {}
            for kind in KINDS:
                with self.running(kind, cache) as daemon:
                    self.warm(daemon, self.cached_keys)
                    before = [
                        self._short(daemon, HEADLINE_CONNS).p99_us / 1000
                        for _ in range(HANG_ROUNDS)
                    ]
                    during = self._with_hangers(daemon, kind, cache)
                quiet[kind] = median(before)
                busy[kind] = median(during)
                self.report.details[f"slow-{cache}-{kind}"] = {"before": before, "during": during}
            section = f"4. slow neighbour, {cache}"
            self.report.add(
                Row(section, "cached p99 ms, undisturbed", quiet["ours"], quiet["peer"], "{:.2f}")
            )
            self.report.add(
                Row(
                    section,
                    f"cached p99 ms, {HANG_CONNS} conns on hanging hosts",
                    busy["ours"],
                    busy["peer"],
                    "{:.2f}",
                    target="≤ 2x undisturbed",
                    holds=busy["ours"] <= 2 * quiet["ours"],
                    note=f"undisturbed: ours {quiet['ours']:.2f}, peer {quiet['peer']:.2f}",
                )
            )

    def _short(self, daemon: Daemon, conns: int) -> loadgen.Result:
        """A cached round short enough that three fit in the fetch timeout of the hangers."""
        self.check_budget()
        result = self.load.run(
            daemon.port,
            self.cached_keys,
            conns=conns,
            duration=1.5,
            warmup=0.3,
            pid=daemon.pid,
            timeout=30,
        )
        if result.ok != result.answered or result.errors:
            raise RuntimeError(f"{daemon.kind}/{daemon.cache}: cached round failed: {result}")
        return result

    def _with_hangers(self, daemon: Daemon, kind: str, cache: str) -> list[float]:
        names = [bedtools.domain(f"bh-{kind}-{cache}-{i}") for i in range(HANG_CONNS)]
        hosts = [f"mta-sts.{name}" for name in names]
        base = sum(self.bed.https.request_count(host) for host in hosts)
        hangers = self.load.start(
            daemon.port, names, conns=HANG_CONNS, timeout=daemons.FETCH_TIMEOUT + 5
        )
        try:
            # The daemon is waiting on every hanging host once they all received their GET.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if sum(self.bed.https.request_count(host) for host in hosts) - base >= HANG_CONNS:
                    break
                time.sleep(0.02)
            else:
                raise RuntimeError(f"{kind}/{cache}: the hanging policy hosts were not all asked")
            started = time.monotonic()
            during = [self._short(daemon, HEADLINE_CONNS).p99_us / 1000 for _ in range(HANG_ROUNDS)]
            if hangers.poll() is not None:
                raise RuntimeError(f"{kind}/{cache}: the hanging requests ended during the rounds")
            if time.monotonic() - started > daemons.FETCH_TIMEOUT:
                raise RuntimeError(f"{kind}/{cache}: rounds outlasted the fetch timeout")
            return during
        finally:
            hangers.kill()
            hangers.wait()

    # 5. scale -----------------------------------------------------------------------------------

    def scale(self) -> None:
        say("5. scale: 100000 domains in the SQLite cache")
        figures: dict[tuple[str, int], dict[str, float]] = {}
        for kind in KINDS:
            for size in (SCALE_BASE, SCALE_DOMAINS):
                self.check_budget()
                keys = [bedtools.domain(f"sc{i:06d}") for i in range(size)]
                path = self._dir(f"{kind}-fill-{size}") / "cache.sqlite"
                path.parent.mkdir(parents=True, exist_ok=True)
                started = time.monotonic()
                (fill_ours if kind == "ours" else fill_peer)(path, keys)
                fill_s = time.monotonic() - started
                with self.running(kind, "sqlite", path) as daemon:
                    first = self.load.run(
                        daemon.port, keys, conns=SCALE_CONNS, once=True, timeout=300
                    )
                    if first.ok != size:
                        raise RuntimeError(f"{kind}: first pass over {size} gave {first}")
                    rounds = [self.timed(daemon, keys, SCALE_CONNS) for _ in range(self.s.rounds)]
                    rss = daemon.rss_bytes() / 2**20
                size_mb = (
                    sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
                    / 2**20
                )
                figures[(kind, size)] = {
                    "rps": median([r.rps for r in rounds]),
                    "cpu": median([r.cpu_us_per_request for r in rounds]),
                    "rss": rss,
                    "file": size_mb,
                    "first_rps": first.rps,
                }
                self.report.details[f"scale-{kind}-{size}"] = {
                    "fill_s": fill_s,
                    "first": asdict(first),
                    "rounds": [asdict(r) for r in rounds],
                    "rss_mb": rss,
                    "file_mb": size_mb,
                }
        ours_big, peer_big = figures[("ours", SCALE_DOMAINS)], figures[("peer", SCALE_DOMAINS)]
        ours_small, peer_small = figures[("ours", SCALE_BASE)], figures[("peer", SCALE_BASE)]
        section = "5. scale, sqlite"
        n = f"{SCALE_DOMAINS // 1000}k"
        self.report.add(
            Row(
                section,
                f"RSS MB, {n} domains answered",
                ours_big["rss"],
                peer_big["rss"],
                target=f"< {RSS_LIMIT_MB:.0f} MB",
                holds=ours_big["rss"] < RSS_LIMIT_MB,
            )
        )
        self.report.add(
            Row(
                section, f"cache file MB, {n} domains", ours_big["file"], peer_big["file"], "{:.1f}"
            )
        )
        self.report.add(
            Row(section, f"answers/s, {SCALE_BASE} domains", ours_small["rps"], peer_small["rps"])
        )
        self.report.add(Row(section, f"answers/s, {n} domains", ours_big["rps"], peer_big["rps"]))
        self.report.add(
            Row(
                section,
                f"daemon CPU µs/answer, {SCALE_BASE} → {n} domains",
                ours_big["cpu"],
                peer_big["cpu"],
                "{:.1f}",
                note=f"at {SCALE_BASE}: ours {ours_small['cpu']:.1f}, peer {peer_small['cpu']:.1f}",
            )
        )
        keep = {
            k: figures[(k, SCALE_DOMAINS)]["rps"] / figures[(k, SCALE_BASE)]["rps"] for k in KINDS
        }
        self.report.add(
            Row(
                section,
                f"answers/s {n} ÷ {SCALE_BASE} domains",
                keep["ours"],
                keep["peer"],
                "{:.2f}",
                target="≥ 0.80",
                holds=keep["ours"] >= 0.8,
            )
        )
        self.report.add(
            Row(
                section,
                f"first answers/s from the file, {n}",
                ours_big["first_rps"],
                peer_big["first_rps"],
            )
        )

    # 6. start-up --------------------------------------------------------------------------------

    def startup(self) -> None:
        say("6. start-up")
        ready: dict[str, list[float]] = {k: [] for k in KINDS}
        for _ in range(self.s.startup_rounds):
            for kind in KINDS:
                with self.running(kind, "sqlite") as daemon:
                    ready[kind].append(daemon.ready_after)
        query: list[float] = []
        with self.running("ours", "sqlite") as daemon:
            self.warm(daemon, self.cached_keys[:1], conns=1)
            for _ in range(self.s.startup_rounds):
                self.check_budget()
                started = time.monotonic()
                done = subprocess.run(
                    [
                        str(daemons.OURS_BIN),
                        "query",
                        "--socketmap",
                        f"inet:127.0.0.1:{daemon.port}",
                        self.cached_keys[0],
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    cwd=self.workdir,
                    env=daemons.clean_env(),
                )
                query.append(time.monotonic() - started)
                if done.returncode != 0 or "secure" not in done.stdout:
                    raise RuntimeError(f"query --socketmap failed: {done}")
        self.report.details["startup"] = {"ready": ready, "query": query}
        ms = {k: median(ready[k]) * 1000 for k in KINDS}
        limit = STARTUP_LIMIT_S * 1000
        self.report.add(
            Row(
                "6. start-up",
                "serve: exec to first answer, ms",
                ms["ours"],
                ms["peer"],
                target=f"< {limit:.0f} ms",
                holds=ms["ours"] < limit,
            )
        )
        self.report.add(
            Row(
                "6. start-up",
                "query --socketmap, one key, wall ms",
                median(query) * 1000,
                None,
                target=f"< {limit:.0f} ms",
                holds=median(query) * 1000 < limit,
                note="the peer has no socketmap client",
            )
        )

    # 7. cached answers on a shared store ------------------------------------------------------

    def cached_shared(self) -> None:
        say("7. cached answers, Redis and PostgreSQL caches")
        servers = self.servers()
        for backend in SHARED:
            store = servers.store(backend, "cached")
            ours = self.start("ours", backend, store=store)
            peer = self.start("peer", backend, store=store)
            try:
                for daemon in (ours, peer):
                    self.warm(daemon, self.cached_keys)
                    # Answers from a daemon that could not use the store would measure memory.
                    servers.check_stored(daemon, store, self.cached_keys)
                runs: dict[str, list[loadgen.Result]] = {k: [] for k in KINDS}
                for _ in range(self.s.rounds):
                    for daemon in (ours, peer):
                        runs[daemon.kind].append(
                            self.timed(daemon, self.cached_keys, HEADLINE_CONNS)
                        )
                self._cached_rows(7, backend, HEADLINE_CONNS, runs)
            finally:
                self.stop(ours)
                self.stop(peer)

    # 8. fleet stampede --------------------------------------------------------------------------

    def fleet_stampede(self) -> None:
        say(f"8. fleet stampede: {FLEET_DAEMONS} daemons on one Redis / PostgreSQL store")
        servers = self.servers()
        total = FLEET_DAEMONS * FLEET_CONNS
        for backend in SHARED:
            store = servers.store(backend, "fleet")
            gets: dict[str, list[int]] = {k: [] for k in KINDS}
            txt: dict[str, list[int]] = {k: [] for k in KINDS}
            walls: dict[str, list[float]] = {k: [] for k in KINDS}
            oks: dict[str, list[int]] = {k: [] for k in KINDS}
            for kind in KINDS:
                fleet: list[Daemon] = []
                try:
                    for _ in range(FLEET_DAEMONS):
                        fleet.append(self.start(kind, backend, store=store))
                    for r in range(self.s.rounds):
                        self.check_budget()
                        names = [bedtools.domain(x) for x in self._fleet_labels(kind, backend, r)]
                        results = self._fleet_round(fleet, names)
                        # Counted after txt_queries' pause: a GET made after the answers counts.
                        counts = bedtools.txt_queries(self.bed, names)
                        round_gets = [self.bed.https.request_count(f"mta-sts.{n}") for n in names]
                        servers.check_stored(fleet[0], store, names)
                        gets[kind] += round_gets
                        txt[kind] += [counts[n] for n in names]
                        # The clients that waited longest: first request to last answer.
                        walls[kind].append(max(result.elapsed for result in results))
                        oks[kind].append(sum(result.ok for result in results))
                        self.report.details[f"fleet-{backend}-{kind}-{r}"] = {
                            "results": [asdict(result) for result in results],
                            "https_gets": dict(zip(names, round_gets, strict=True)),
                            "txt_queries": counts,
                        }
                finally:
                    for daemon in fleet:
                        self.stop(daemon)
            section = f"8. fleet stampede, {backend}, {FLEET_DAEMONS} daemons"
            all_ok = all(ok == total for ok in oks["ours"])
            asked = total // FLEET_DOMAINS
            self.report.add(
                Row(
                    section,
                    "HTTPS GETs per domain (max of rounds)",
                    float(max(gets["ours"])),
                    float(max(gets["peer"])),
                    target="exactly 1, all OK",
                    holds=all(n == 1 for n in gets["ours"]) and all_ok,
                    note=f"{FLEET_DOMAINS} new domains, each asked {asked} times at once over the"
                    f" {FLEET_DAEMONS} daemons",
                )
            )
            self.report.add(
                Row(
                    section,
                    "TXT queries per domain (max of rounds)",
                    float(max(txt["ours"])),
                    float(max(txt["peer"])),
                )
            )
            self.report.add(
                Row(
                    section,
                    "wall s, first request to last answer",
                    median(walls["ours"]),
                    median(walls["peer"]),
                    fmt="{:.2f}",
                    note=f"{total} requests; policy hosts answer after {FLEET_DELAY * 1000:.0f} ms",
                )
            )
            self.report.add(
                Row(
                    section,
                    f"OK answers of {total} (min of rounds)",
                    float(min(oks["ours"])),
                    float(min(oks["peer"])),
                )
            )

    def _fleet_round(self, fleet: Sequence[Daemon], names: Sequence[str]) -> list[loadgen.Result]:
        """Every daemon's clients ask for ``names`` at the same moment, one request per
        connection, each name on FLEET_CONNS / len(names) connections of every daemon."""
        keys = [names[i % len(names)] for i in range(FLEET_CONNS)]
        started = []
        try:
            for daemon in fleet:
                started.append(self.load.start(daemon.port, keys, conns=FLEET_CONNS, timeout=60))
            results = [self.load.finish(process, timeout=90) for process in started]
        finally:
            for process in started:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for daemon, result in zip(fleet, results, strict=True):
            if result.errors or result.connect_failures:
                raise RuntimeError(
                    f"{daemon.kind}/{daemon.cache}: fleet round failed: {result}; its log:\n"
                    f"{daemon.log()}"
                )
        return results


# --------------------------------------------------------------------------------------------------
# The Redis and PostgreSQL servers of measurements 7 and 8.


class SharedServers:
    """One redis-server and one PostgreSQL cluster of tests/dbservers.py, on loopback in temporary
    directories. Ours and the peer keep apart: on Redis ours uses database 0 (under a key prefix)
    and the peer database 1 (its keys are bare domain names); on PostgreSQL ours uses the database
    ``mtasts`` (a table per measurement) and the peer a database of its own (fixed table names)."""

    PEER_DATABASE = "peer"

    def __init__(self) -> None:
        import dbservers  # tests/, put on the path by bedtools

        self.redis = dbservers.RedisServer()
        self.postgres = dbservers.PostgresServer()
        try:
            self.redis.start()
            self.postgres.start()
            self.postgres.psql(f"CREATE DATABASE {self.PEER_DATABASE}")
        except BaseException:
            self.close()
            raise

    def store(self, backend: str, name: str) -> SharedStore:
        """Where a measurement's daemons keep their cache; ``name`` sets ours apart per
        measurement (the peer's layout has no prefix or table name to set)."""
        if backend == "redis":
            return SharedStore(
                backend,
                self.redis.url,
                f"bench-{name}:",
                f"redis://127.0.0.1:{self.redis.port}/1",
            )
        return SharedStore(
            backend,
            self.postgres.url,
            f"bench_{name}",
            f"postgresql://postgres@127.0.0.1:{self.postgres.port}/{self.PEER_DATABASE}",
        )

    def stored(self, kind: str, store: SharedStore, names: Sequence[str]) -> int:
        """How many of ``names`` the daemons of ``kind`` hold in ``store``."""
        if kind == "ours":
            from postfix_mtasts.store import open_store

            ours = open_store(store.backend, "", url=store.url, name=store.name, timeout=5.0)
            try:
                return sum(ours.get(name) is not None for name in names)
            finally:
                ours.close()
        if store.backend == "redis":
            import redis

            client = redis.Redis.from_url(
                store.peer_url, socket_timeout=5, socket_connect_timeout=5
            )
            try:
                return int(client.exists(*names))
            finally:
                client.close()
        import psycopg

        with psycopg.connect(store.peer_url, connect_timeout=5) as db:
            row = db.execute(
                "SELECT count(*) FROM sts_policy_cache WHERE domain = ANY(%s)", (list(names),)
            ).fetchone()
        return int(row[0]) if row else 0

    def check_stored(self, daemon: Daemon, store: SharedStore, names: Sequence[str]) -> None:
        """Raise unless the store holds every one of ``names`` within STORED_WITHIN seconds."""
        deadline = time.monotonic() + STORED_WITHIN
        while True:
            held = self.stored(daemon.kind, store, names)
            if held == len(names):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{daemon.kind}/{daemon.cache}: the {store.backend} store holds {held} of the"
                    f" {len(names)} domains answered, {STORED_WITHIN:.0f}s after; its log:\n"
                    f"{daemon.log()}"
                )
            time.sleep(0.1)

    def close(self) -> None:
        try:
            self.redis.cleanup()
        finally:
            self.postgres.cleanup()


# --------------------------------------------------------------------------------------------------
# Filling the SQLite caches for measurement 5.


def _policy(domain: str) -> str:
    return f"version: STSv1\nmode: enforce\nmx: mail.{domain}\nmx: *.example.net\nmax_age: 86400\n"


def fill_ours(path: Path, keys: Sequence[str]) -> None:
    """Fresh, valid entries through postfix_mtasts.store (the daemon's own store API)."""
    from postfix_mtasts.store import Entry, open_store

    store = open_store("sqlite", str(path))
    try:
        now = time.time()
        for i, domain in enumerate(keys):
            store.put(
                Entry(
                    domain=domain,
                    record_id=f"sc{i}",
                    policy_text=_policy(domain),
                    fetched_at=now,
                    expires_at=now + 86400,
                    checked_at=now,
                    last_used=now,
                )
            )
    finally:
        store.close()


def fill_peer(path: Path, keys: Sequence[str]) -> None:
    """The same entries in postfix-mta-sts-resolver's schema (sqlite_cache.py of 1.5.1)."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "create table if not exists proactive_fetch_ts "
            "(id integer primary key, last_fetch_ts integer)"
        )
        db.execute(
            "create table if not exists sts_policy_cache "
            "(domain text, ts integer, pol_id text, pol_body text)"
        )
        db.execute(
            "create unique index if not exists sts_policy_domain on sts_policy_cache (domain)"
        )
        db.execute(
            "create index if not exists sts_policy_domain_ts on sts_policy_cache (domain, ts)"
        )
        now = int(time.time())
        rows = (
            (
                domain,
                now,
                f"sc{i}",
                json.dumps(
                    {
                        "version": "STSv1",
                        "mode": "enforce",
                        "mx": [f"mail.{domain}", "*.example.net"],
                        "max_age": 86400,
                    }
                ),
            )
            for i, domain in enumerate(keys)
        )
        with db:
            db.executemany("insert into sts_policy_cache values (?, ?, ?, ?)", rows)
    finally:
        db.close()


# --------------------------------------------------------------------------------------------------
# Output.


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def own_cpu_seconds() -> float:
    """CPU of this process and every child it has waited for (daemons, load generator, bed)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0))
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} ({affinity} usable)",
        "cpu_model": model or platform.processor() or "unknown",
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def table(report: Report, info: dict[str, str], *, targets_only: bool = False) -> str:
    """The markdown table; ``targets_only``: just the rows that carry a target (README.md)."""
    lines = [
        f"Run {info['date']} on {info['cpus']} CPUs ({info['cpu_model']}), {info['memory']}, "
        f"Linux {info['kernel']}, Python {info['python']}; "
        f"peer: postfix-mta-sts-resolver {daemons.PEER_VERSION} (uvloop). "
        f"Medians over {info['rounds']} rounds. Other processes kept {info['others']} CPUs busy "
        "on average during the run."
        + (f" Ours ran with {info['ours']}." if info.get("ours") else ""),
        "",
        "| measurement | metric | ours | peer | ours/peer | target | holds |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in report.rows:
        if targets_only and row.holds is None:
            continue
        ratio = row.ratio()
        holds = {True: "yes", False: "**NO**", None: ""}[row.holds]
        note = f" ({row.note})" if row.note else ""
        lines.append(
            f"| {row.section} | {row.metric}{note} | {_fmt(row.fmt, row.ours)} | "
            f"{_fmt(row.fmt, row.peer)} | {'—' if ratio is None else f'{ratio:.2f}'} | "
            f"{row.target} | {holds} |"
        )
    for error in report.errors:
        lines.append(f"\nERROR: {error}")
    return "\n".join(lines)


def update_readme(path: Path, marker: str, text: str) -> None:
    """Replace what stands between ``<!-- MARKER:start -->`` and ``<!-- MARKER:end -->``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    readme = path.read_text()
    if start not in readme or end not in readme:
        say(f"{path}: no {start} ... {end} markers; not updated")
        return
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")
    say(f"updated {path}")


# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=Settings.rounds, help="rounds per figure (median)"
    )
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per cached round")
    parser.add_argument(
        "--only",
        default=",".join(str(n) for n in sorted(ALL_MEASUREMENTS)),
        help="measurements to run, e.g. 1,3 or 7,8 (default: all)",
    )
    parser.add_argument(
        "--peer-venv", type=Path, default=daemons.DEFAULT_PEER_VENV, help="the peer's venv"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="run our daemons with [metrics] on (needs the metrics extra), to measure its cost",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="write the table into benchmarks/README.md and its target rows into README.md"
        " (a full run only: the table is replaced as a whole)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say(
            "benchmarks: run as root (port 443 for the policy hosts, a mount namespace for"
            " the peer)"
        )
        return 2
    if not 1 <= args.rounds <= 20 or not 0.5 <= args.duration <= 30:
        parser.error("--rounds 1..20, --duration 0.5..30")
    try:
        only = frozenset(int(x) for x in args.only.split(",") if x.strip())
    except ValueError:
        parser.error(f"--only: expected numbers 1..8 separated by commas, got {args.only!r}")
    if not only or not only <= ALL_MEASUREMENTS:
        parser.error(f"--only: expected numbers 1..8 separated by commas, got {args.only!r}")
    if args.update_readme and only != ALL_MEASUREMENTS:
        parser.error("--update-readme writes the whole table: run every measurement (no --only)")
    if args.update_readme and args.metrics:
        parser.error("--update-readme records the default configuration: run without --metrics")
    settings = Settings(rounds=args.rounds, duration=args.duration, only=only, metrics=args.metrics)
    workdir = Path(tempfile.mkdtemp(prefix="postfix-mtasts-bench-", dir="/var/tmp"))
    info = machine()
    info["rounds"] = str(settings.rounds)
    if settings.metrics:
        info["ours"] = "[metrics] on"
    started = time.monotonic()
    busy0, _ = busy_jiffies()
    own0 = own_cpu_seconds()
    bench: Bench | None = None
    steps: list[tuple[int, Callable[[Bench], None]]] = [
        (1, Bench.cached),
        (2, Bench.fanout),
        (3, Bench.stampede),
        (4, Bench.slow_neighbour),
        (5, Bench.scale),
        (6, Bench.startup),
        (7, Bench.cached_shared),
        (8, Bench.fleet_stampede),
    ]
    try:
        bench = Bench(settings, workdir, args.peer_venv)
        for number, step in steps:
            if number in settings.only:
                try:
                    step(bench)
                except Exception as exc:
                    traceback.print_exc()
                    bench.report.errors.append(f"measurement {number}: {exc}")
    except Exception as exc:
        traceback.print_exc()
        say(f"benchmarks: cannot run: {exc}")
        return 2
    finally:
        if bench is not None:
            bench.close()
        if args.keep:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = bench.report
    elapsed = time.monotonic() - started
    # CPU that other processes used meanwhile (a test run, a build): figures taken on a busy
    # machine are lower than on an idle one; the table says how busy it was.
    busy1, _ = busy_jiffies()
    other = max(0.0, (busy1 - busy0) / os.sysconf("SC_CLK_TCK") - (own_cpu_seconds() - own0))
    info["others"] = f"{other / elapsed:.2f}"
    text = table(report, info)
    print()
    print(text)
    missed = [row for row in report.rows if row.holds is False]
    print(
        f"\n{len(missed)} target(s) missed, {len(report.errors)} error(s); "
        f"{elapsed:.0f}s in all; {info['cpus']} CPUs"
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "latest.json").write_text(
        json.dumps(
            {
                "machine": info,
                "rows": [asdict(r) | {"ratio": r.ratio()} for r in report.rows],
                "errors": report.errors,
                "details": report.details,
            },
            indent=1,
            default=str,
        )
    )
    (RESULTS_DIR / "latest.md").write_text(text + "\n")
    if args.update_readme:
        update_readme(README, "results", text)
        update_readme(
            REPO / "README.md", "benchmark-targets", table(report, info, targets_only=True)
        )
    if report.errors:
        return 2
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
