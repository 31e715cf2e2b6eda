#!/usr/bin/env python3
"""Coverage-guided fuzzing of the policy parser, `mtasts.parse_policy`.

An input is a policy body as an HTTPS server serves it, bytes. `parser_properties.check_policy`:
only `PolicySyntaxError`; an accepted policy keeps RFC 8461 §3.2's invariants, every mx pattern is
its line's ASCII value lower-cased (a non-ASCII character that folds to ASCII is refused), and the
policy re-serialises to text that parses back equal. See fuzz/README.md.

    .venv/bin/python fuzz/fuzz_policy.py -max_total_time=600 /tmp/corpus-policy fuzz/corpus/policy
"""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["postfix_mtasts", "parser_properties", "idna"]):
    import parser_properties


def test_one_input(data: bytes) -> None:
    parser_properties.check_policy(data)


def main() -> None:
    harness.fuzz(test_one_input, "policy")


if __name__ == "__main__":
    main()
