#!/usr/bin/env python3
"""Coverage-guided fuzzing of key normalisation, `postfix.policy_domain`.

An input is a lookup key as a client sends it: UTF-8 text (what `parse_request` lets through), or,
for bytes that are not UTF-8, text the fuzzer's data provider makes of them (any code point but
surrogates), so that every Unicode trick is tried. `parser_properties.check_key`: the result is
None or a lowercase ASCII host name that maps to itself, a port is ASCII digits, and an ASCII key
gives its own host part. See fuzz/README.md.

    .venv/bin/python fuzz/fuzz_keys.py -max_total_time=600 /tmp/corpus-keys fuzz/corpus/keys
"""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["postfix_mtasts", "parser_properties", "idna"]):
    import parser_properties


def test_one_input(data: bytes) -> None:
    parser_properties.check_key(harness.as_text(data))


def main() -> None:
    harness.fuzz(test_one_input, "keys")


if __name__ == "__main__":
    main()
