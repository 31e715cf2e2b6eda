#!/usr/bin/env python3
"""Line coverage of a parser by a fuzzing corpus: the figure fuzz/README.md reports per target.

libFuzzer's ``cov:`` counts edges in every instrumented module, the property checks included; this
says how many lines of the parser's own functions the corpus reaches, and which ones it does not.
It replays every file of the given corpus directories through the target's harness under the
standard library's `trace` module (no fuzzing, no atheris instrumentation).

    .venv/bin/python fuzz/line_coverage.py policy /tmp/corpus-policy fuzz/corpus/policy
"""

from __future__ import annotations

import dis
import importlib
import inspect
import sys
import trace
import types
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import parser_properties

from postfix_mtasts import config, mtasts, netstring, postfix

# The parser's own functions, per target: what a fuzzer of that target is meant to reach.
PARSERS: dict[str, list[object]] = {
    "netstring": [netstring.Decoder.feed, netstring.Decoder._length, netstring.parse_request],
    "keys": [
        postfix.policy_domain,
        postfix._general_policy_domain,
        mtasts.to_alabel,
        mtasts.is_hostname,
    ],
    "record": [mtasts.parse_record, mtasts.is_sts_record],
    "policy": [
        mtasts.parse_policy,
        mtasts._policy_lines,
        mtasts._parse_mx.__wrapped__,
        mtasts.is_hostname,
    ],
    "config": [config.loads, config._parse, config._profile, config._Table],
}


def _netstring(data: bytes) -> None:
    # fuzz_netstring.test_one_input, line for line.
    sizes = [byte % 16 + 1 for byte in data[:64]]
    batch = data[-1] % 3 + 1 if data else 1
    for limit in (netstring.MAX_QUERY, 9):
        parser_properties.check_netstring(data, [], limit)
        parser_properties.check_netstring(data, sizes, limit)
    parser_properties.check_netstring(data, [1] * len(data), netstring.MAX_QUERY)
    parser_properties.check_netstring(data, sizes, netstring.MAX_QUERY, max_frames=batch)


# Byte input -> what the harness hands the checks (the harnesses' own conversion, without atheris).
CHECKS: dict[str, Callable[[bytes], object]] = {
    "netstring": _netstring,
    "keys": lambda data: parser_properties.check_key(data.decode("utf-8", "replace")),
    "record": lambda data: parser_properties.check_record(data.decode("utf-8", "replace")),
    "policy": parser_properties.check_policy,
    "config": lambda data: parser_properties.check_config(data.decode("utf-8", "replace")),
}


def _lines(code: types.CodeType) -> set[int]:
    lines = {line for _, line in dis.findlinestarts(code) if line is not None}
    lines.discard(code.co_firstlineno)  # the "def" line runs at import, not per call
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            lines |= _lines(const)
    return lines


def _code_objects(item: object) -> Iterable[types.CodeType]:
    if inspect.isclass(item):
        for member in vars(item).values():
            function = getattr(member, "fget", member)
            if inspect.isfunction(function):
                yield function.__code__
    elif inspect.isfunction(item):
        yield item.__code__


def main() -> None:
    target, *directories = sys.argv[1:]
    tracer = trace.Trace(count=1, trace=0)
    inputs = [p for d in directories for p in sorted(Path(d).iterdir()) if p.is_file()]
    for path in inputs:
        try:
            tracer.runfunc(CHECKS[target], path.read_bytes())
        except Exception as exc:  # a finding: say so, and go on counting lines
            print(f"  {path} raised {type(exc).__name__}: {str(exc)[:120]}")
    counts = tracer.results().counts
    total = missed = 0
    for item in PARSERS[target]:
        for code in _code_objects(item):
            lines = _lines(code)
            hit = {line for line in lines if counts.get((code.co_filename, line))}
            total += len(lines)
            missed += len(lines - hit)
            if lines - hit:
                name = f"{Path(code.co_filename).name}:{code.co_qualname}"
                print(f"  not reached in {name}: lines {sorted(lines - hit)}")
    print(f"{target}: {len(inputs)} inputs, {total - missed}/{total} lines of the parser reached")


if __name__ == "__main__":
    importlib.invalidate_caches()
    main()
