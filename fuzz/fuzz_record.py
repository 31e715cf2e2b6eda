#!/usr/bin/env python3
"""Coverage-guided fuzzing of the TXT record parser, `mtasts.parse_record`.

An input is the text of one TXT record as DNS serves it: UTF-8, or, for bytes that are not, text
the fuzzer's data provider makes of them. `parser_properties.check_record`: only
`RecordSyntaxError`, the same verdict as the reference parser, and an accepted record
re-serialises to a record that parses back equal. See fuzz/README.md.

    .venv/bin/python fuzz/fuzz_record.py -max_total_time=600 /tmp/corpus-record fuzz/corpus/record
"""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["postfix_mtasts", "parser_properties"]):
    import parser_properties


def test_one_input(data: bytes) -> None:
    parser_properties.check_record(harness.as_text(data))


def main() -> None:
    harness.fuzz(test_one_input, "record")


if __name__ == "__main__":
    main()
