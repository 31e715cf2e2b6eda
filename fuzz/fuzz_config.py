#!/usr/bin/env python3
"""Coverage-guided fuzzing of the configuration loader, `config.loads`.

An input is a configuration file; like `config.load`, bytes that are not UTF-8 are refused before
parsing. `parser_properties.check_config`: a Config or `ConfigError`, nothing else, and `dump` of
a Config loads back equal. See fuzz/README.md.

    .venv/bin/python fuzz/fuzz_config.py -max_total_time=600 /tmp/corpus-config fuzz/corpus/config
"""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["postfix_mtasts", "parser_properties", "tomllib"]):
    import parser_properties


def test_one_input(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    parser_properties.check_config(text)


def main() -> None:
    harness.fuzz(test_one_input, "config")


if __name__ == "__main__":
    main()
