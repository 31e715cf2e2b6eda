"""``python -m postfix_mtasts query`` run against the test bed, the way a postmaster runs it: the
bed's resolver and CA, and the options a test adds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bed import Bed

REPO = Path(__file__).resolve().parent.parent

# The slow and hanging policy hosts are given this deadline; the CLI must give up soon after it.
HTTPS_TIMEOUT = 2.0


def query(
    bed: Bed,
    *arguments: str,
    nameserver: str | None = None,
    private: bool = True,
    https_timeout: float = HTTPS_TIMEOUT,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``arguments`` (options, then domains) after the bed's settings; ``private``: with
    --allow-private-addresses (the bed's servers are on loopback)."""
    argv = [
        sys.executable,
        "-m",
        "postfix_mtasts",
        "query",
        "--nameserver",
        nameserver or bed.resolver_nameservers[0],
        "--ca-file",
        bed.ca_file,
        *(["--allow-private-addresses"] if private else []),
        "--https-timeout",
        str(https_timeout),
        *arguments,
    ]
    return subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
