"""The test suite's DNS + HTTPS bed (tests/bed.py), used as it is, plus what benchmarks need.

- ``start_bed``: ``Bed.start`` with two settings changed from outside the module (tests/bed.py is
  not edited): unbound logs every query it receives (``log-queries``), so a benchmark can count the
  TXT queries a daemon made; and the HTTPS server's listen backlog is raised from socketserver's 5
  to 1024, so 500 policy fetches opened at once are not dropped by the kernel and retried a second
  later (that would measure the bed, not the daemons).
- ``publish``: many test domains in a few dynamic updates (``Bed.add_domain`` makes two updates
  per domain, about 20 ms each) and their policy hosts' behaviour.
- ``txt_queries``: how many TXT queries for ``_mta-sts.<domain>`` reached the resolver.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import dns.name
import dns.query
import dns.rcode
import dns.rdataset
import dns.update

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import bed as bedmod  # noqa: E402  (tests/ is put on the path just above)
from bed import Bed, Response, policy_text  # noqa: E402

__all__ = [
    "ZONE",
    "Bed",
    "Response",
    "domain",
    "policy_response",
    "publish",
    "start_bed",
    "txt_queries",
]

ZONE = bedmod.ZONE
# Records per dynamic update message (two per domain); far below the 64 KiB of a DNS message.
_UPDATE_BATCH = 200
HTTPS_BACKLOG = 1024


def domain(label: str) -> str:
    """``<label>.mtasts.test``."""
    return f"{label}.{ZONE}"


def policy_response(label: str, *, delay: float = 0.0, hang: bool = False) -> Response:
    """A valid ``enforce`` policy for ``<label>``, answered at once, after ``delay``, or never."""
    body = policy_text("enforce", (f"mail.{domain(label)}", "*.example.net"))
    return Response(body=body, delay=delay, hang=hang)


def record_id(label: str) -> str:
    """An RFC 8461 id (1*32 ALPHA / DIGIT) for a label."""
    return ("b" + re.sub(r"[^A-Za-z0-9]", "", label))[:31] + "1"


def start_bed(workdir: Path) -> Bed:
    """Start the bed with unbound's query log on and a large HTTPS listen backlog."""
    workdir.mkdir(parents=True, exist_ok=True)
    return Bed.start(workdir, log_queries=True, https_backlog=HTTPS_BACKLOG)


def publish(bed: Bed, domains: Iterable[tuple[str, Response]]) -> None:
    """Publish ``(label, response)`` domains: a TXT record with a fixed id, the policy host's
    address, and how the policy host answers. Batched: a few updates for hundreds of domains."""
    items = list(domains)
    origin = dns.name.from_text(ZONE)
    for start in range(0, len(items), _UPDATE_BATCH // 2):
        update = dns.update.UpdateMessage(origin)
        for label, _ in items[start : start + _UPDATE_BATCH // 2]:
            txt = dns.rdataset.from_text(
                "IN", "TXT", bedmod.RECORD_TTL, f'"v=STSv1; id={record_id(label)};"'
            )
            update.replace(dns.name.from_text(f"_mta-sts.{label}", origin), txt)
            a = dns.rdataset.from_text("IN", "A", bedmod.RECORD_TTL, bed.https_address)
            update.replace(dns.name.from_text(f"mta-sts.{label}", origin), a)
        answer = dns.query.tcp(update, "127.0.0.1", port=bed.knot_port, timeout=10)
        if answer.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"dynamic update refused: {dns.rcode.to_text(answer.rcode())}")
    for label, response in items:
        bed.https.set_response(f"mta-sts.{domain(label)}", response)


def _unbound_log(bed: Bed) -> Path:
    path = bed.workdir / "unbound" / "unbound.log"
    if not path.exists():
        found = sorted(bed.workdir.glob("**/unbound*.log"))
        if not found:
            raise RuntimeError(f"no unbound log under {bed.workdir}")
        path = found[0]
    return path


def txt_queries(bed: Bed, names: Sequence[str], settle: float = 0.3) -> dict[str, int]:
    """TXT queries for ``_mta-sts.<name>`` that reached unbound, per name (after ``settle``
    seconds, so the last log lines are written)."""
    time.sleep(settle)
    wanted = {f" _mta-sts.{name}. TXT IN": name for name in names}
    counts = dict.fromkeys(names, 0)
    with open(_unbound_log(bed), errors="replace") as log:
        for line in log:
            if " TXT IN" not in line:
                continue
            for needle, name in wanted.items():
                if line.rstrip("\n").endswith(needle):
                    counts[name] += 1
    return counts
