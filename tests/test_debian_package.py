"""The Debian package (docs/debian-package.md), built, installed, used and purged on this machine.

- packaging/config.toml, the package's /etc/postfix-mtasts/config.toml, holds every key config.py
  accepts, commented out, with its default.
- `packaging/build-deb` builds the .deb (or POSTFIX_MTASTS_DEB names one this run built already);
  `dpkg -i` installs it; the installed command answers `--version`, `check-config` (as root and as
  the package's user) and serves as the package's user; `man -w` finds both pages; the units run
  the installed command as the system user and pass `systemd-analyze verify`.
- `dpkg -r` leaves the conffile (and systemd's record that the service is enabled, which Debian
  keeps until a purge); `dpkg -P` leaves nothing of the package but its system user.

Needs root, dpkg and the build's packages (build-essential debhelper dh-virtualenv python3-dev
python3-venv), and PyPI for the virtualenv's dependencies. The package is never left installed:
the module's fixture purges it whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts import __version__, config

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "postfix-mtasts"
USER = "postfix-mtasts"
VENV = Path("/opt/venvs/postfix-mtasts")
CONFFILE = Path("/etc/postfix-mtasts/config.toml")
STATE = Path("/var/lib/postfix-mtasts")
UNITS = Path("/lib/systemd/system")
BUILD_PACKAGES = ("build-essential", "debhelper", "dh-virtualenv", "python3-dev", "python3-venv")

# Where a file of the package, or one it makes, could be left behind.
LEFTOVER_ROOTS = ("/etc", "/opt", "/usr", "/lib/systemd", "/var/lib", "/var/log", "/run")
# man-db's cache of formatted pages: made by whoever runs man, cleaned by man-db itself.
NOT_THE_PACKAGES = ("/var/cache/man",)

# A commented key or table header in packaging/config.toml: "#key = value", "#[maps.NAME]".
COMMENTED_SETTING = re.compile(r"^#(?=\[|[a-z_]+ = )")


def run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(command)}: exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def package_status() -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True, text=True
    )
    return result.stdout if result.returncode == 0 else "not installed"


def user_exists() -> bool:
    return subprocess.run(["getent", "passwd", USER], capture_output=True).returncode == 0


def leftovers() -> set[str]:
    """Every path under LEFTOVER_ROOTS whose name says postfix-mtasts."""
    found = set()
    for root in LEFTOVER_ROOTS:
        for directory, subdirectories, files in os.walk(root):
            if directory.startswith(NOT_THE_PACKAGES):
                subdirectories[:] = []
                continue
            for name in subdirectories + files:
                if PACKAGE in name:
                    found.add(os.path.join(directory, name))
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def uncommented(text: str) -> str:
    return "\n".join(COMMENTED_SETTING.sub("", line) for line in text.splitlines())


# --------------------------------------------------------------------------------------------------
# The configuration file the package installs.


def test_packaged_configuration_holds_every_key_config_accepts_with_its_default() -> None:
    text = (REPO / "packaging" / "config.toml").read_text(encoding="utf-8")
    settings = uncommented(text)
    maps = tomllib.loads(settings).get("maps", {})
    assert len(maps) == 1, "packaging/config.toml: one commented [maps.NAME] example expected"
    everything = config.Config(maps={name: config.Profile() for name in maps})

    in_file = set(flatten(tomllib.loads(settings)))
    accepted = set(flatten(tomllib.loads(config.dump(everything))))
    assert in_file == accepted, (
        f"packaging/config.toml: missing {sorted(accepted - in_file)}, "
        f"unknown {sorted(in_file - accepted)}"
    )
    # Each value is the default: uncommenting every line changes nothing (cache.path is root's).
    assert config.loads(settings, "packaging/config.toml", daemon_files=False) == everything
    # As shipped, everything commented: the same as no file at all.
    assert config.loads(text, "packaging/config.toml", daemon_files=False) == config.Config()


# --------------------------------------------------------------------------------------------------
# Built, installed, purged.


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the Debian package test installs a package: run it as root", pytrace=False)
    for tool in ("dpkg", "dpkg-buildpackage", "man", "systemd-analyze", "runuser", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: tests/run installs its package", pytrace=False)
    prebuilt = os.environ.get("POSTFIX_MTASTS_DEB")
    if prebuilt:
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("deb")
    built = run(str(REPO / "packaging" / "build-deb"), str(out))
    path = Path(built.stdout.strip())
    assert path.parent == out and path.name == f"{PACKAGE}_{__version__}_amd64.deb", built.stdout
    return path


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[set[str]]:
    """The package installed; yields what was left of postfix-mtasts before. Purged afterwards."""
    status = package_status()
    if status != "not installed" and "not-installed" not in status:
        pytest.fail(f"{PACKAGE} is already on this machine ({status}): not touching it")
    before = leftovers()
    user_before = user_exists()
    # As on a machine where services must not start on install (tests/run does the same).
    policy_rc = Path("/usr/sbin/policy-rc.d")
    added_policy_rc = not policy_rc.exists()
    if added_policy_rc:
        policy_rc.write_text("#!/bin/sh\nexit 101\n")
        policy_rc.chmod(0o755)
    try:
        run("dpkg", "-i", str(deb))
        yield before
    finally:
        subprocess.run(["dpkg", "-P", PACKAGE], capture_output=True)
        if added_policy_rc:
            policy_rc.unlink()
        # The package leaves its user (as Debian does); this machine gets back what it had.
        if not user_before and user_exists():
            subprocess.run(["deluser", "--system", "--quiet", USER], capture_output=True)
            subprocess.run(["delgroup", "--system", "--quiet", USER], capture_output=True)


def test_installed_command_reports_the_version(installed: set[str]) -> None:
    assert Path("/usr/bin/postfix-mtasts").resolve() == VENV / "bin" / "postfix-mtasts"
    result = run("/usr/bin/postfix-mtasts", "--version")
    assert result.stdout.strip() == f"postfix-mtasts {__version__}"


def test_check_config_accepts_the_installed_configuration(installed: set[str]) -> None:
    as_root = run("postfix-mtasts", "check-config")
    assert config.loads(as_root.stdout, "check-config", daemon_files=False) == config.Config()
    # As the service unit runs it: its user, and its state directory as XDG_STATE_HOME.
    as_user = run(
        "runuser", "-u", USER, "--", "env", "XDG_STATE_HOME=/var/lib",
        "postfix-mtasts", "check-config", "-c", str(CONFFILE),
    )  # fmt: skip
    assert 'path = "/var/lib/postfix-mtasts/cache.sqlite"' in as_user.stdout


def test_man_finds_both_pages(installed: set[str]) -> None:
    assert run("man", "-w", "postfix-mtasts").stdout.strip() == (
        "/usr/share/man/man8/postfix-mtasts.8.gz"
    )
    assert run("man", "-w", "postfix-mtasts.toml").stdout.strip() == (
        "/usr/share/man/man5/postfix-mtasts.toml.5.gz"
    )


def test_files_user_and_state_directory_are_in_place(installed: set[str]) -> None:
    conffiles = run("dpkg-query", "--showformat=${Conffiles}", "-W", PACKAGE).stdout
    assert str(CONFFILE) in conffiles
    assert CONFFILE.read_text() == (REPO / "packaging" / "config.toml").read_text()
    passwd = run("getent", "passwd", USER).stdout.split(":")
    assert int(passwd[2]) < 1000, f"{USER} is not a system user: {passwd}"
    assert passwd[6].strip() in ("/usr/sbin/nologin", "/bin/false")
    state = STATE.stat()
    assert (state.st_uid, state.st_mode & 0o777) == (int(passwd[2]), 0o750)
    for unit in ("postfix-mtasts.service", "postfix-mtasts.socket"):
        assert (UNITS / unit).is_file()


def test_units_run_the_installed_command_as_the_system_user(installed: set[str]) -> None:
    service = (UNITS / "postfix-mtasts.service").read_text()
    assert "\nExecStart=/usr/bin/postfix-mtasts serve\n" in service
    assert f"\nUser={USER}\n" in service
    assert "DynamicUser" not in service
    run("systemd-analyze", "verify", str(UNITS / "postfix-mtasts.service"),
        str(UNITS / "postfix-mtasts.socket"))  # fmt: skip
    # Enabled at install, the socket unit not (it needs listen = ["systemd"]).
    assert Path("/etc/systemd/system/multi-user.target.wants/postfix-mtasts.service").is_symlink()
    assert not Path("/etc/systemd/system/sockets.target.wants/postfix-mtasts.socket").exists()


def test_installed_daemon_answers_as_its_user(installed: set[str]) -> None:
    endpoint = f"inet:127.0.0.1:{free_port()}"
    # Readable by the package's user (pytest's own tmp_path is root's alone).
    directory = Path(tempfile.mkdtemp(prefix="postfix-mtasts-deb-"))
    try:
        directory.chmod(0o755)
        conf = directory / "config.toml"
        conf.write_text(f'listen = ["{endpoint}"]\n')
        conf.chmod(0o644)
        # setpriv executes the daemon itself (runuser would stay its parent), so SIGTERM reaches it.
        daemon = subprocess.Popen(
            ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups",
             "/usr/bin/postfix-mtasts", "serve", "-c", str(conf)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "XDG_STATE_HOME": "/var/lib"},
        )  # fmt: skip
        try:
            # Until it listens: a slow start on a busy machine is not a failure.
            deadline = time.monotonic() + 60
            while True:
                health = subprocess.run(
                    ["postfix-mtasts", "health", "--socketmap", endpoint, "--timeout", "30"],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                if health.returncode == 0 or daemon.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert health.returncode == 0, health.stdout + health.stderr
            assert health.stdout.startswith("OK: ")
            cache = STATE / "cache.sqlite"
            assert cache.stat().st_uid == int(run("id", "-u", USER).stdout)
        finally:
            daemon.terminate()
            output, _ = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, output
    finally:
        shutil.rmtree(directory)


def test_remove_leaves_the_conffile_and_purge_leaves_only_the_user(installed: set[str]) -> None:
    before = installed
    run("dpkg", "-r", PACKAGE)
    assert not Path("/usr/bin/postfix-mtasts").exists()
    left = leftovers() - before
    # Debian keeps the conffile and systemd's record of the admin's choice (deb-systemd-helper)
    # until a purge; dpkg keeps its own record of the package's config-files state.
    kept = {
        str(CONFFILE.parent),
        str(CONFFILE),
        "/etc/systemd/system/multi-user.target.wants/postfix-mtasts.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/postfix-mtasts.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-enabled/postfix-mtasts.socket.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/"
        "postfix-mtasts.service",
        "/var/lib/dpkg/info/postfix-mtasts.list",
        "/var/lib/dpkg/info/postfix-mtasts.postrm",
    }
    assert left <= kept, f"left after dpkg -r: {sorted(left - kept)}"
    assert CONFFILE.is_file()
    assert not VENV.exists()
    assert not STATE.exists()

    run("dpkg", "-P", PACKAGE)
    assert leftovers() - before == set()
    assert not VENV.exists() and not CONFFILE.parent.exists()
    assert package_status() == "not installed" or "not-installed" in package_status()
    assert user_exists(), "the system user stays after a purge (docs/debian-package.md)"
