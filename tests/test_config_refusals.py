"""Issue 10 item 8: a configuration that cannot work is refused by the real commands.

Each case of the issue is written to a file next to a listener on a free loopback port (so that
the daemon could start if the value were accepted), and given to ``python -m postfix_mtasts
check-config -c FILE`` and ``python -m postfix_mtasts serve -c FILE`` as a postmaster would run
them. Both must exit 2 with one line on stderr that names the file and the dotted key, and no
traceback anywhere: under ``Restart=on-failure`` a traceback is a restart loop nobody can read.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A refused configuration exits long before this; a daemon still running then accepted it.
EXIT_WITHIN = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _text_ca_file(directory: Path) -> str:
    path = directory / "ca.pem"
    path.write_text("This is a text file, not a PEM certificate.\n")
    return f'[https]\nca_file = "{path}"\n'


# The five cases of the issue: the configuration text (given a fresh directory) and its key.
CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "ca_file without certificates": (_text_ca_file, "https.ca_file"),
    "https.timeout = 1e10": (lambda _: "[https]\ntimeout = 1e10\n", "https.timeout"),
    "listen = []": (lambda _: "", "listen"),
    "log.file that cannot be opened": (
        lambda d: f'[log]\nfile = "{d}/no-such-directory/daemon.log"\n',
        "log.file",
    ),
    "request_timeout = 200": (
        lambda _: "[server]\nrequest_timeout = 200\n",
        "server.request_timeout",
    ),
}


def _write_config(directory: Path, case: str) -> tuple[Path, str]:
    make, key = CASES[case]
    listen = "[]" if case == "listen = []" else f'["inet:127.0.0.1:{_free_port()}"]'
    path = directory / "config.toml"
    path.write_text(
        f"listen = {listen}\n"
        # Nothing outside the test's directory: no cache file, no pid file, no system log.
        f'[cache]\nbackend = "memory"\npath = "{directory}/cache.sqlite"\n' + make(directory)
    )
    return path, key


def _run(command: str, config_path: Path) -> tuple[int, str, str]:
    """Run ``python -m postfix_mtasts COMMAND -c FILE``; a daemon that does not exit within
    EXIT_WITHIN accepted the file and is stopped (status None in the failure message)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "postfix_mtasts", command, "-c", str(config_path)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(
            f"{command} -c {config_path} was still running after {EXIT_WITHIN:.0f}s: the value "
            f"was accepted; its stderr:\n{stderr}",
            pytrace=False,
        )
    return process.returncode, stdout, stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_value_that_cannot_work_is_refused_in_one_line_naming_file_and_key(
    tmp_path: Path, command: str, case: str
) -> None:
    config_path, key = _write_config(tmp_path, case)
    status, stdout, stderr = _run(command, config_path)
    output = f"exit status {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert "Traceback" not in stdout + stderr, output
    assert status == 2, output
    lines = stderr.splitlines()
    assert len(lines) == 1, output
    assert f"{config_path}: {key}: " in lines[0], output
