"""Build and run loadgen.c, the socketmap load generator (see the comment at its top).

It is compiled with the machine's gcc on first use (and again when the source changes) into
``benchmarks/.build/``; a run is one process, and its JSON line becomes a ``Result``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "loadgen.c"
BUILD_DIR = Path(__file__).resolve().parent / ".build"


@dataclass(frozen=True)
class Result:
    answered: int
    elapsed: float
    rps: float
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    ok: int
    notfound: int
    temp: int
    other: int
    errors: int
    unanswered: int
    connect_failures: int
    daemon_cpu_s: float
    loadgen_cpu_s: float
    connect_s: float

    @property
    def cpu_us_per_request(self) -> float:
        """The daemon's CPU time (user + system) per answered request, in microseconds."""
        if self.answered <= 0 or self.daemon_cpu_s < 0:
            return float("nan")
        return self.daemon_cpu_s / self.answered * 1e6

    @property
    def loadgen_cpu_us_per_request(self) -> float:
        return self.loadgen_cpu_s / self.answered * 1e6 if self.answered else float("nan")


def build() -> Path:
    """Compile loadgen.c unless an up-to-date binary exists; its path."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = BUILD_DIR / f"loadgen-{digest}"
    if not binary.exists():
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        for old in BUILD_DIR.glob("loadgen-*"):
            old.unlink()
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-o", str(binary), str(SOURCE)], check=True, timeout=120
        )
    return binary


class LoadGen:
    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Path] = {}

    def keys_file(self, keys: Sequence[str]) -> Path:
        text = "".join(f"{key}\n" for key in keys)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = self._files.get(digest)
        if path is None:
            path = self.workdir / f"keys-{digest}.txt"
            path.write_text(text)
            self._files[digest] = path
        return path

    def argv(
        self,
        port: int,
        keys: Sequence[str],
        *,
        conns: int,
        duration: float = 3.0,
        warmup: float = 0.5,
        once: bool = False,
        timeout: float = 60.0,
        pid: int = 0,
    ) -> list[str]:
        argv = [
            str(self.binary),
            "--port",
            str(port),
            "--keys",
            str(self.keys_file(keys)),
            "--conns",
            str(conns),
            "--timeout",
            str(timeout),
        ]
        if once:
            argv.append("--once")
        else:
            argv += ["--duration", str(duration), "--warmup", str(warmup)]
        if pid:
            argv += ["--pid", str(pid)]
        return argv

    def run(
        self,
        port: int,
        keys: Sequence[str],
        *,
        conns: int,
        duration: float = 3.0,
        warmup: float = 0.5,
        once: bool = False,
        timeout: float = 60.0,
        pid: int = 0,
    ) -> Result:
        argv = self.argv(
            port,
            keys,
            conns=conns,
            duration=duration,
            warmup=warmup,
            once=once,
            timeout=timeout,
            pid=pid,
        )
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
        if done.returncode != 0:
            raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip()}")
        return Result(**json.loads(done.stdout))

    def start(
        self, port: int, keys: Sequence[str], *, conns: int, timeout: float
    ) -> subprocess.Popen[str]:
        """A ``--once`` run in the background (the harness stops it, or it ends at ``timeout``;
        ``finish`` collects its result)."""
        argv = self.argv(port, keys, conns=conns, once=True, timeout=timeout)
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    @staticmethod
    def finish(process: subprocess.Popen[str], timeout: float) -> Result:
        """The result of a run begun with ``start``, waiting for it up to ``timeout`` seconds
        (killed past that)."""
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"loadgen did not finish within {timeout:.0f}s") from None
        if process.returncode != 0:
            raise RuntimeError(f"loadgen failed ({process.returncode}): {err.strip()}")
        return Result(**json.loads(out))
