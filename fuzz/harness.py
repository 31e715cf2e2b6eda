"""What the five harnesses share: starting libFuzzer with the target's dictionary and a mutation
libFuzzer lacks.

A dictionary gives libFuzzer the grammar's tokens and the non-ASCII characters that case-folding
or str.isdigit() take for ASCII; without one, minutes of fuzzing did not find the two Unicode
defects of issue 10 that the keys and policy harnesses find within seconds with one (README.md).

The mutation repeats a short piece of the input many times over: long runs of one thing (a
thousand "[", an integer of four hundred digits, WSP without a delimiter) are what deep recursion,
overflow and super-linear parsing need, and libFuzzer's own mutations insert at most 128 bytes.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

# One mutation in REPEAT_ONE_IN repeats a piece; the others are libFuzzer's own.
REPEAT_ONE_IN = 8


def repeat_a_piece(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's custom mutator: mostly libFuzzer's mutation, sometimes a piece of 1 to 8 bytes
    repeated in place up to the length limit."""
    chooser = random.Random(seed)
    if not data or chooser.randrange(REPEAT_ONE_IN):
        mutated: bytes = atheris.Mutate(data, max_size)
        return mutated
    start = chooser.randrange(len(data))
    end = min(len(data), start + chooser.randint(1, 8))
    piece = data[start:end]
    room = max(0, max_size - len(data)) // len(piece)
    times = chooser.randint(1, room) if room else 0
    return (data[:end] + piece * times + data[end:])[:max_size]


def fuzz(test_one_input: Callable[[bytes], None], target: str) -> None:
    """Run libFuzzer on `test_one_input` with the command line's options and corpus directories,
    adding ``-dict=fuzz/<target>.dict`` unless a ``-dict=`` is given."""
    args = list(sys.argv)
    if not any(arg.startswith("-dict=") for arg in args[1:]):
        args.append(f"-dict={Path(__file__).resolve().parent / f'{target}.dict'}")
    atheris.Setup(args, test_one_input, custom_mutator=repeat_a_piece)
    atheris.Fuzz()


def as_text(data: bytes) -> str:
    """The input as text: UTF-8 when it is, else the text the data provider makes of the bytes
    (any code point but surrogates), so that non-UTF-8 inputs still try every Unicode trick."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text: str = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
        return text
