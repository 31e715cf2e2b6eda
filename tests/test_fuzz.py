"""The coverage-guided fuzzers of fuzz/ (atheris), each for a CI-sized run.

Each harness runs in its own process, from a copy of its seed corpus, for a fixed number of inputs
with a fixed seed, so that a failure here is the same failure on the next run. A crash, an
exception a parser must not raise, a property violation (fuzz/parser_properties.py) or an input
that takes longer than the per-input limit makes libFuzzer stop with a non-zero status and write
the input to a crash-* (or timeout-*) file; the test then fails and shows the end of the output.

atheris is a test dependency (the `fuzz` extra that tests/run installs): without it the harnesses
cannot start and these tests fail; they are never skipped. The long runs and their figures are in
fuzz/README.md.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"

# Inputs per target: a few seconds each on a 2-core machine (the harnesses differ in cost: the
# netstring one feeds every input six ways).
RUNS = {"netstring": 2000, "keys": 20000, "record": 50000, "policy": 70000, "config": 12000}


def test_atheris_is_installed() -> None:
    # A clear failure, rather than five harnesses failing to import it.
    importlib.import_module("atheris")


@pytest.mark.parametrize(("target", "runs"), RUNS.items())
def test_fuzzer_finds_no_crash_and_no_property_violation(
    target: str, runs: int, tmp_path: Path
) -> None:
    # libFuzzer adds the inputs it finds to the first corpus directory: a copy, not the seeds.
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target, corpus)
    command = [
        sys.executable,
        str(FUZZ / f"fuzz_{target}.py"),
        f"-runs={runs}",
        "-seed=1",
        "-timeout=20",
        "-max_len=1024",  # up to 4 KiB, the repeat mutation made these runs twice as long
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
    ]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=100, check=False
    )
    output = (result.stdout + result.stderr)[-4000:]
    artifacts = sorted(path.name for path in tmp_path.glob("*-*") if path.is_file())
    assert result.returncode == 0, f"fuzz_{target}.py failed:\n{output}"
    assert not artifacts, f"fuzz_{target}.py left {artifacts}:\n{output}"
    assert f"Done {runs} runs" in result.stderr, output
