"""The man pages, postfix-mtasts(8) and postfix-mtasts.toml(5): they render without a warning
through groff and man-db, and they cannot drift from the code. The command page documents every
command and every option string of the argparse parser, the configuration page exactly the keys
config.py accepts, with their defaults, and setuptools installs both where `man` finds them.

The pages are read in their roff source, in the structure their header comments describe: a
`.SS` heading per command or table, a `.TP` tag per option or key.
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from postfix_mtasts import cli, config

REPO = Path(__file__).resolve().parent.parent
COMMAND_PAGE = REPO / "man" / "postfix-mtasts.8"
CONFIG_PAGE = REPO / "man" / "postfix-mtasts.toml.5"
PAGES = [COMMAND_PAGE, CONFIG_PAGE]

# Added by the health check's own branch at the same time as this page; the page documents it
# already, and the parser has it once both are merged.
HEALTH_OPTIONS = {"-c", "--config", "--socketmap", "--timeout"}

# The default cache path depends on who runs the daemon; the page shows root's.
ROOT_CACHE_PATH = "/var/lib/postfix-mtasts/cache.sqlite"

# setuptools run on setup.cfg alone, as a build backend does.
SETUPTOOLS = [sys.executable, "-c", "import setuptools; setuptools.setup()"]

_FONT = re.compile(r"\\f[BIRP]")
_OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


def _plain(roff: str) -> str:
    """A line of roff as it reads: fonts dropped, the escapes these pages use replaced."""
    text = _FONT.sub("", roff)
    for escape, char in (("\\-", "-"), ("\\(dq", '"'), ("\\&", "")):
        text = text.replace(escape, char)
    return text.strip()


def _tags(page: Path, chapter: str) -> dict[str, list[str]]:
    """The `.TP` tags of each `.SS` section of one `.SH` chapter, by the section's heading."""
    sections: dict[str, list[str]] = {}
    current_chapter = ""
    heading: str | None = None
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".SH "):
            current_chapter, heading = _plain(line[4:]).strip('"'), None
            if current_chapter == chapter:
                heading = ""
                sections[heading] = []
        elif line.startswith(".SS ") and current_chapter == chapter:
            heading = _plain(line[4:]).strip('"')
            assert heading not in sections, f"{page.name}: two sections {heading!r}"
            sections[heading] = []
        elif line == ".TP" and heading is not None:
            assert not lines[i + 1].startswith("."), (
                f"{page.name}: a tag in a macro: {lines[i + 1]}"
            )
            sections[heading].append(_plain(lines[i + 1]))
    return sections


def _options(tags: list[str]) -> set[str]:
    return {option for tag in tags for option in _OPTION.findall(tag)}


def _render(page: Path) -> str:
    """The page as `man` shows it, into a pipe, 80 columns wide."""
    environment = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    environment.pop("MANPAGER", None)
    environment.pop("PAGER", None)
    done = subprocess.run(
        ["man", "-l", str(page)], env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    return done.stdout


def _commands(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, set[str]]]:
    """Each command's path ("", "serve", "cache list") and its option strings, help excepted."""
    options: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _commands(subparser, f"{path} {name}".strip())
        elif not isinstance(action, argparse._HelpAction):
            options.update(action.option_strings)
    yield path, options


# --------------------------------------------------------------------------------------------------
# Both pages


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_page_renders_through_groff_without_a_warning(page: Path) -> None:
    done = subprocess.run(
        ["groff", "-ww", "-z", "-man", str(page)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_page_renders_through_man_in_80_columns(page: Path) -> None:
    text = _render(page)
    name = page.name.rsplit(".", 1)[0]
    section = page.suffix[1:]
    assert text.splitlines()[0].startswith(f"{name.upper()}({section})")
    for chapter in ("NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "SEE ALSO"):
        assert f"\n{chapter}\n" in text
    assert f"{name} - " in text
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert too_wide == []


def test_setuptools_installs_both_pages_where_man_finds_them(tmp_path: Path) -> None:
    # setup.cfg's data_files, installed by setuptools itself, as pip does into a prefix.
    done = subprocess.run(
        [*SETUPTOOLS, "-q", "install_data", "--install-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    environment = dict(os.environ, MANPATH=str(tmp_path / "share" / "man"))
    for topic, installed in (
        ("postfix-mtasts", tmp_path / "share/man/man8/postfix-mtasts.8"),
        ("postfix-mtasts.toml", tmp_path / "share/man/man5/postfix-mtasts.toml.5"),
    ):
        found = subprocess.run(
            ["man", "-w", topic], env=environment, capture_output=True, text=True, timeout=60
        )
        assert found.returncode == 0, found.stderr
        assert found.stdout.strip() == str(installed)
        assert installed.read_bytes() == (REPO / "man" / installed.name).read_bytes()


def test_readme_names_both_pages() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "`man postfix-mtasts`" in readme
    assert "`man postfix-mtasts.toml`" in readme
    data_files = configparser.ConfigParser()
    data_files.read(REPO / "setup.cfg")
    assert dict(data_files["options.data_files"]) == {
        "share/man/man8": "man/postfix-mtasts.8",
        "share/man/man5": "man/postfix-mtasts.toml.5",
    }


# --------------------------------------------------------------------------------------------------
# postfix-mtasts(8)


def test_command_page_documents_every_command_and_option_of_the_parser() -> None:
    parser = cli.build_parser()
    commands = dict(_commands(parser))
    page = {heading: _options(tags) for heading, tags in _tags(COMMAND_PAGE, "COMMANDS").items()}
    page.pop("", None)

    # A section per command, and no section for a command the parser does not have.
    assert set(commands) - {""} <= set(page)
    assert set(page) - set(commands) <= {"health"}
    for command, options in commands.items():
        if not command:
            continue
        # A subcommand's options may be documented once on its parent (cache's -c).
        parent = command.rpartition(" ")[0]
        documented = page[command] | page.get(parent, set())
        assert options <= documented, f"{command}: not on the page: {options - documented}"
        assert page[command] <= options, f"{command}: not in the parser: {page[command] - options}"

    # The program's own options, and -h/--help, which every command and subcommand takes.
    global_options = _options(_tags(COMMAND_PAGE, "GLOBAL OPTIONS")[""])
    assert global_options == commands[""] | {"-h", "--help"}
    assert all({"-h", "--help"} <= set(p._option_string_actions) for p in _parsers(parser))

    # The option strings read as typed (ASCII hyphens) where a user reads them.
    rendered = _render(COMMAND_PAGE)
    words = set(_OPTION.findall(rendered))
    every_option = set().union(*commands.values(), global_options, HEALTH_OPTIONS)
    assert every_option <= words
    for command in commands:
        assert f"postfix-mtasts {command}" in rendered


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from _parsers(subparser)


def test_command_page_documents_health_with_its_three_options() -> None:
    page = {heading: _options(tags) for heading, tags in _tags(COMMAND_PAGE, "COMMANDS").items()}
    assert page["health"] == HEALTH_OPTIONS
    rendered = _render(COMMAND_PAGE)
    assert "postfix-mtasts health [-c FILE] [--socketmap ENDPOINT] [--timeout" in rendered
    assert "OK: ..." in rendered and "CRITICAL: ..." in rendered
    assert "(default: 5 seconds)" in rendered


def test_command_page_gives_exit_statuses_of_every_command() -> None:
    commands = {name for name, _ in _commands(cli.build_parser()) if name and " " not in name}
    statuses = set(_tags(COMMAND_PAGE, "EXIT STATUS")[""])
    assert commands | {"health"} <= statuses
    assert "query --socketmap" in statuses


def test_command_page_names_the_signals_the_daemon_handles_and_its_files() -> None:
    signals = _tags(COMMAND_PAGE, "SIGNALS")[""]
    assert signals == ["SIGHUP", "SIGTERM, SIGINT"]
    service = (REPO / "postfix_mtasts" / "service.py").read_text(encoding="utf-8")
    handled = set(re.findall(r"signal\.(SIG[A-Z]+)", service))
    assert handled == {"SIGHUP", "SIGTERM", "SIGINT"}

    files = _tags(COMMAND_PAGE, "FILES")[""]
    assert files == [config.DEFAULT_PATH, ROOT_CACHE_PATH, config.ServerConfig().pid_file]
    if os.geteuid() == 0:
        assert config.default_cache_path() == ROOT_CACHE_PATH


# --------------------------------------------------------------------------------------------------
# postfix-mtasts.toml(5)


def _flatten(table: dict[str, object], prefix: str = "") -> dict[str, object]:
    keys: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            keys.update(_flatten(value, f"{prefix}{key}."))
        else:
            keys[f"{prefix}{key}"] = value
    return keys


def _accepted_keys() -> dict[str, object]:
    """Every key config.py accepts, with its default, from what dump() writes (one map: NAME)."""
    everything = config.Config(maps={"NAME": config.Profile()})
    return _flatten(tomllib.loads(config.dump(everything)))


def _page_keys() -> dict[str, str]:
    """Every key of the configuration page, dotted, with its default as written there."""
    keys: dict[str, str] = {}
    for heading, tags in _tags(CONFIG_PAGE, "KEYS").items():
        if heading == "":
            assert tags == []
            continue
        table = "" if heading == "Top level" else heading.strip("[]") + "."
        for tag in tags:
            key, equals, default = tag.partition(" = ")
            assert equals, f"{heading}: tag {tag!r} is not KEY = DEFAULT"
            assert f"{table}{key}" not in keys
            keys[f"{table}{key}"] = default
    return keys


def test_configuration_page_lists_exactly_the_keys_config_accepts() -> None:
    assert set(_page_keys()) == set(_accepted_keys())


def test_configuration_page_gives_each_key_its_default() -> None:
    accepted = _accepted_keys()
    for key, default in _page_keys().items():
        value = tomllib.loads(f"value = {default}")["value"]
        expected = ROOT_CACHE_PATH if key == "cache.path" else accepted[key]
        assert value == expected, f"{key}: the page says {default}, config.py {expected!r}"


def test_configuration_page_read_as_a_file_gives_the_defaults() -> None:
    # Every key with the page's default, in one file: config.py accepts it, and it changes nothing.
    tables: dict[str, list[str]] = {}
    for key, default in _page_keys().items():
        table, _, name = key.rpartition(".")
        tables.setdefault(table, []).append(f"{name} = {default}")
    text = "\n".join(tables.pop(""))
    text += "".join(f"\n[{table}]\n" + "\n".join(lines) for table, lines in tables.items())
    loaded = config.loads(text, "postfix-mtasts.toml.5", daemon_files=False)
    expected = config.Config(maps={"NAME": config.Profile()})
    expected = replace(expected, cache=replace(expected.cache, path=ROOT_CACHE_PATH))
    assert loaded == expected


def test_configuration_page_and_reference_list_the_same_keys() -> None:
    # docs/configuration.md: "## `[server]`" (or "## Top level") headings over "| `key` |" rows.
    reference: set[str] = set()
    tables: list[str] = []
    for line in (REPO / "docs" / "configuration.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            named = re.findall(r"`\[([^\]]+)\]`", line)
            tables = [""] if line == "## Top level" else [f"{name}." for name in named]
        elif match := re.match(r"\| `(\w+)` \|", line):
            reference.update(f"{table}{match[1]}" for table in tables)
    assert reference == set(_page_keys())


def test_configuration_page_shows_every_key_where_a_user_reads_it() -> None:
    rendered = _render(CONFIG_PAGE)
    for key, default in _page_keys().items():
        assert f"{key.rpartition('.')[2]} = {default}" in rendered
