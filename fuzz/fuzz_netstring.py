#!/usr/bin/env python3
"""Coverage-guided fuzzing of the socketmap wire format: `netstring.Decoder` and `parse_request`.

An input is the byte stream a local client sends. It is fed in one read and in reads of sizes
taken from its own bytes, to decoders with Postfix's request limit and with a limit of 9 bytes;
byte by byte; and in reads taking one to three frames at a time (``max_frames``), as the server
does. `parser_properties.check_netstring` holds each run to the reference decoder and checks every
frame as a request. See fuzz/README.md.

    .venv/bin/python fuzz/fuzz_netstring.py -max_total_time=600 /tmp/corpus fuzz/corpus/netstring
"""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["postfix_mtasts", "parser_properties"]):
    import parser_properties

    from postfix_mtasts.netstring import MAX_QUERY


def test_one_input(data: bytes) -> None:
    sizes = [byte % 16 + 1 for byte in data[:64]]
    batch = data[-1] % 3 + 1 if data else 1
    for limit in (MAX_QUERY, 9):
        parser_properties.check_netstring(data, [], limit)
        parser_properties.check_netstring(data, sizes, limit)
    parser_properties.check_netstring(data, [1] * len(data), MAX_QUERY)
    parser_properties.check_netstring(data, sizes, MAX_QUERY, max_frames=batch)


def main() -> None:
    harness.fuzz(test_one_input, "netstring")


if __name__ == "__main__":
    main()
