"""Properties of every parser that takes remote or client input (issue 10, fuzzing and properties).

The parsers: the netstring decoder and ``parse_request`` (bytes a local client sends), key
normalisation ``postfix.policy_domain`` (the key in a request), ``parse_record`` (a TXT record from
DNS), ``parse_policy`` (a body from HTTPS) and ``config.loads`` (a local file). Hypothesis drives
the checks of fuzz/parser_properties.py, the same ones the atheris fuzzers run (tests/test_fuzz.py),
and adds properties that need generated valid values:

- round trip: a value built from any valid fields, and anything a parser accepts, serialises to
  text the parser reads back to the same value;
- character set: an accepted policy domain or mx pattern is ASCII letters, digits, hyphens and
  dots, whatever case-folding would make of a non-ASCII character in the input (KELVIN SIGN
  lower-cases to "k", ARABIC-INDIC DIGIT ONE is a digit to ``str.isdigit``): characters are judged
  before case;
- linear time: no input makes a parser take more than linear time. Measured as growth (the time
  for an input eight times as long, divided by the time for the shorter one), never as a speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
import time
import unicodedata
from collections.abc import Callable
from logging.handlers import SysLogHandler
from pathlib import Path
from typing import Any

import certifi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfix_mtasts import config
from postfix_mtasts.config import MAX_LINE, Config, ConfigError, Profile, dump, loads
from postfix_mtasts.mtasts import (
    MAX_MAX_AGE,
    MX,
    Mode,
    Policy,
    PolicySyntaxError,
    Record,
    RecordSyntaxError,
    is_hostname,
    parse_policy,
    parse_record,
    printable,
)
from postfix_mtasts.netstring import (
    MAX_QUERY,
    Decoder,
    NetstringError,
    encode,
    parse_request,
)
from postfix_mtasts.postfix import policy_domain

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import parser_properties as props

# Every test here is about inputs, not about time: no deadline (a slow CI machine is not a bug).
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# Characters that are not ASCII but that case-folding, compatibility normalisation or str.isdigit()
# would take for ASCII letters, digits or punctuation: KELVIN SIGN (lower() is "k"), LATIN CAPITAL
# LETTER I WITH DOT ABOVE (lower() starts with "i"), LATIN SMALL LETTER LONG S (casefold() is "s"),
# fullwidth forms, mathematical letters, superscript and Arabic-Indic digits, Unicode spaces.


def _looks_ascii(char: str) -> bool:
    forms = (
        char.lower(),
        char.upper(),
        char.casefold(),
        unicodedata.normalize("NFKC", char),
        unicodedata.normalize("NFKC", char).casefold(),
    )
    ascii_like = any(c.isascii() and (c.isalnum() or c in ".-:*[]") for f in forms for c in f)
    return ascii_like or char.isdigit() or char.isnumeric() or char.isspace()


ASCII_LOOKALIKES = tuple(
    chr(cp) for cp in range(0x80, 0x20000) if not 0xD800 <= cp < 0xE000 and _looks_ascii(chr(cp))
)
assert {"\u212a", "\u0130", "\u017f", "\uff41", "\u0661", "\u00b2", "\u3000"} <= set(
    ASCII_LOOKALIKES
)
NON_ASCII_DIGITS = tuple(c for c in ASCII_LOOKALIKES if c.isdigit())
# The worst of them, drawn as often as all the others: one case-folding makes ASCII of each.
FOLD_TO_ASCII = tuple(
    c
    for c in ASCII_LOOKALIKES
    if c == "\u0130" or any(f(c).isascii() for f in (str.lower, str.upper, str.casefold))
)
assert {"\u212a", "\u017f", "\u0130"} <= set(FOLD_TO_ASCII)


@st.composite
def with_lookalikes(draw: st.DrawFn, texts: st.SearchStrategy[str]) -> str:
    """A text from `texts` with one to three characters replaced by, or one to three inserted,
    ASCII look-alikes."""
    chars = list(draw(texts))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(chars)))
        lookalike = draw(st.sampled_from(FOLD_TO_ASCII) | st.sampled_from(ASCII_LOOKALIKES))
        if at < len(chars) and draw(st.booleans()):
            chars[at] = lookalike
        else:
            chars.insert(at, lookalike)
    return "".join(chars)


# --------------------------------------------------------------------------------------------------
# Strategies for valid values, from the ABNF of RFC 8461 (../shared/reference/rfc8461.md).

LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
ALNUM = LOWER_ALNUM + LOWER_ALNUM[:26].upper()
LDH_LABELS = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"
)
A_LABELS = st.sampled_from(
    ["xn--bcher-kva", "xn--mnchen-3ya", "xn--e1afmkfd", "xn--80akhbyknj4f", "xn--r8jz45g"]
)
LABELS = st.one_of(LDH_LABELS, A_LABELS)
# Host names as RFC 8461 §3.2 allows them in "mx": the last label is not all digits.
HOST_NAMES = (
    st.lists(LABELS, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda name: len(name) <= 253 and not name.rpartition(".")[2].isdigit())
)
DOMAINS = HOST_NAMES.filter(lambda name: "." in name)
MX_VALUES = st.builds(MX, st.booleans(), HOST_NAMES)
FIELD_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", fullmatch=True)
RECORD_IDS = st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True)
# sts-ext-value: visible ASCII but "=" and ";".
RECORD_EXT_VALUES = st.text(
    alphabet=[chr(c) for c in range(0x21, 0x7F) if chr(c) not in "=;"], min_size=1, max_size=20
)
# sts-policy-vchar: visible ASCII or any non-ASCII character UTF-8 can carry.
POLICY_VCHARS = st.characters(min_codepoint=0x21, exclude_characters="\x7f", codec="utf-8")
POLICY_EXT_VALUES = st.builds(
    lambda first, middle, last: first + middle + last,
    POLICY_VCHARS,
    st.text(alphabet=st.one_of(st.just(" "), POLICY_VCHARS), max_size=20),
    st.one_of(st.just(""), POLICY_VCHARS),
).map(lambda value: value.rstrip(" "))
WSP = st.text(alphabet=" \t", max_size=3)

RECORDS = st.builds(
    Record,
    st.just("STSv1"),
    RECORD_IDS,
    st.lists(
        st.tuples(FIELD_NAMES.filter(lambda name: name != "id"), RECORD_EXT_VALUES), max_size=5
    ).map(tuple),
)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    mode = draw(st.sampled_from(list(Mode)))
    mx = draw(st.lists(MX_VALUES, min_size=0 if mode is Mode.NONE else 1, max_size=6))
    extensions = draw(
        st.lists(
            st.tuples(
                FIELD_NAMES.filter(lambda name: name not in props.POLICY_FIELDS),
                POLICY_EXT_VALUES,
            ),
            max_size=4,
        )
    )
    return Policy("STSv1", mode, tuple(mx), draw(st.integers(0, MAX_MAX_AGE)), tuple(extensions))


def random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


@st.composite
def record_texts(draw: st.DrawFn) -> tuple[str, Record]:
    """sts-text-record: the version, fields (a repeated "id" after the first one), and the
    optional final delimiter."""
    record = draw(RECORDS)
    fields = [f"{name}={value}" for name, value in record.extensions]
    fields.insert(draw(st.integers(0, len(fields))), f"id={record.id}")
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(fields.index(f"id={record.id}") + 1, len(fields)))
        fields.insert(at, f"id={draw(RECORD_IDS)}")
    text = "v=STSv1"
    for field in fields:
        text += f"{draw(WSP)};{draw(WSP)}{field}"
    if draw(st.booleans()):
        text += f"{draw(WSP)};{draw(WSP)}"
    return text, record


@st.composite
def policy_texts(draw: st.DrawFn) -> tuple[str, Policy]:
    """sts-policy-record: fields in any order, mx in any case, WSP after ":" and at line ends,
    LF or CRLF, final terminator or none, repeated non-mx fields (the first counts)."""
    policy = draw(policies())
    mx = [("mx", random_case(draw, str(pattern))) for pattern in policy.mx]
    extensions = list(policy.extensions)
    singles = {"version": "STSv1", "mode": str(policy.mode), "max_age": str(policy.max_age)}
    if policy.max_age == MAX_MAX_AGE and draw(st.booleans()):
        singles["max_age"] = str(draw(st.integers(MAX_MAX_AGE, 9_999_999_999)))  # capped
    elif draw(st.booleans()):
        singles["max_age"] = singles["max_age"].rjust(10, "0")  # 1*10DIGIT, leading zeros
    tags = draw(st.permutations([*singles, *["mx"] * len(mx), *["ext"] * len(extensions)]))
    fields = [
        (tag, singles[tag]) if tag in singles else (mx if tag == "mx" else extensions).pop(0)
        for tag in tags
    ]
    fields += draw(
        st.lists(st.tuples(st.sampled_from(list(singles)), POLICY_EXT_VALUES), max_size=2)
    )
    lines = [f"{key}:{draw(WSP)}{value}{draw(WSP)}" for key, value in fields]
    terms = [draw(st.sampled_from(["\n", "\r\n"])) for _ in lines]
    text = "".join(line + term for line, term in zip(lines, terms, strict=True))
    if not draw(st.booleans()):
        text = text[: -len(terms[-1])]
    return text, policy


def enforce_with_mx(value: str) -> str:
    return f"version: STSv1\nmode: enforce\nmx: {value}\nmax_age: 86400\n"


# --------------------------------------------------------------------------------------------------
# Netstrings and requests.

CHUNKINGS = st.lists(st.integers(1, 40), max_size=30)
LIMITS = st.sampled_from([0, 1, 9, 10, 99, 100, 12345, MAX_QUERY])
# Pieces from which byte streams that are nearly netstrings are made.
STREAM_PIECES = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"0", b"1", b"9", b"10", b":", b",", b"3:abc,", b"0:,", b"00:", b"10000"]),
    st.binary(max_size=20).map(encode),
)


BATCHES = st.sampled_from([0, 0, 1, 2, 3])


@PROPERTY
@given(st.lists(st.binary(max_size=60), max_size=12), CHUNKINGS, BATCHES)
def test_encoded_payloads_decode_to_themselves_in_any_chunking(
    payloads: list[bytes], chunks: list[int], batch: int
) -> None:
    stream = b"".join(encode(payload) for payload in payloads)
    assert props.check_netstring(stream, chunks, MAX_QUERY, batch) == payloads


@PROPERTY
@given(
    st.one_of(st.binary(max_size=200), st.lists(STREAM_PIECES, max_size=12).map(b"".join)),
    CHUNKINGS,
    LIMITS,
    BATCHES,
)
def test_any_bytes_decode_as_the_reference_says_in_any_chunking(
    stream: bytes, chunks: list[int], limit: int, batch: int
) -> None:
    # Frames, or bytes held for later (never more than one frame and its length once every
    # complete frame is taken), or FramingError; the same outcome however the bytes arrive.
    props.check_netstring(stream, chunks, limit, batch)


REQUEST_CHARS = st.sampled_from(" postfix.example:[]\x00\x1f\x7f\x85\x9f\xa0é")
REQUEST_TEXT = st.text(
    alphabet=st.one_of(REQUEST_CHARS, st.characters(exclude_categories=["Cs"])), max_size=40
)


@PROPERTY
@given(
    st.one_of(
        # Surrogates encoded as if they were characters: not UTF-8.
        st.text(alphabet=st.one_of(REQUEST_CHARS, st.characters()), max_size=40).map(
            lambda text: text.encode("utf-8", "surrogatepass")
        ),
        REQUEST_TEXT.map(str.encode),
        st.binary(max_size=40),
        st.tuples(REQUEST_TEXT, REQUEST_TEXT).map(lambda p: f"{p[0]} {p[1]}".encode()),
    )
)
def test_parse_request_accepts_exactly_name_space_key_and_rebuilds_the_payload(
    payload: bytes,
) -> None:
    props.check_request(payload)


# --------------------------------------------------------------------------------------------------
# Keys.

KEY_PREFIXES = st.sampled_from(["", "", "", ".", "[", "*."])
KEY_SUFFIXES = st.one_of(
    st.sampled_from(["", "", ".", "]", ":25", ":587", "]:25", ":", ":x"]),
    st.text(alphabet=st.sampled_from(["1", "2", *NON_ASCII_DIGITS]), min_size=1, max_size=5).map(
        lambda port: ":" + port
    ),
)


@PROPERTY
@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(lambda p, d, s: p + d + s, KEY_PREFIXES, DOMAINS, KEY_SUFFIXES),
        st.builds(lambda p, d, s: p + d + s, KEY_PREFIXES, with_lookalikes(DOMAINS), KEY_SUFFIXES),
        st.builds(lambda d: d.upper(), with_lookalikes(DOMAINS)),
    )
)
def test_any_key_gives_none_or_an_ascii_host_name_that_maps_to_itself(key: str) -> None:
    props.check_key(key)


@PROPERTY
@given(
    DOMAINS,
    st.text(alphabet=st.sampled_from(["0", "2", "5", *NON_ASCII_DIGITS]), min_size=1, max_size=5),
)
def test_a_port_is_ascii_digits_only(name: str, port: str) -> None:
    # str.isdigit() is true for superscript, Arabic-Indic and fullwidth digits: none of them is
    # in a port Postfix writes.
    domain = policy_domain(f"{name}:{port}")
    if port.isascii():
        assert domain == name
    else:
        assert domain is None


# --------------------------------------------------------------------------------------------------
# The TXT record.


@PROPERTY
@given(RECORDS)
def test_a_record_serialises_to_text_that_parses_back_to_it(record: Record) -> None:
    text = record.to_text()
    assert parse_record(text) == record
    props.check_record(text)


@PROPERTY
@given(record_texts())
def test_record_texts_from_the_abnf_parse_to_their_record_and_reserialise(
    case: tuple[str, Record],
) -> None:
    text, record = case
    assert parse_record(text) == record
    assert props.check_record(text) == record


RECORD_PIECES = st.one_of(
    st.sampled_from(["v=STSv1", "id=1", "id=" + "a" * 33, "ext=x", "=", ";", " ; ", "\t", "é"]),
    st.text(alphabet="vSTs1id=;x_-. \t\u212a", max_size=10),
)


@PROPERTY
@given(st.one_of(st.text(max_size=100), st.lists(RECORD_PIECES, max_size=12).map("".join)))
def test_any_record_text_is_judged_as_the_abnf_says(text: str) -> None:
    # The reference is the first, regular-expression parser: the rewrite keeps its language.
    props.check_record(text)


# --------------------------------------------------------------------------------------------------
# The policy.


@PROPERTY
@given(policies())
def test_a_policy_serialises_to_text_that_parses_back_to_it(policy: Policy) -> None:
    text = policy.to_text()
    assert parse_policy(text) == policy
    assert parse_policy(text.encode("utf-8")) == policy
    props.check_policy(text)


@PROPERTY
@given(policy_texts())
def test_policy_texts_from_the_abnf_parse_to_their_policy_and_reserialise(
    case: tuple[str, Policy],
) -> None:
    text, policy = case
    assert parse_policy(text) == policy
    assert props.check_policy(text.encode("utf-8")) == policy


@PROPERTY
@given(with_lookalikes(st.builds(str, MX_VALUES)))
def test_an_mx_with_a_non_ascii_character_is_refused_whatever_it_folds_to(value: str) -> None:
    # RFC 8461 §3.2: A-labels only. "mail.\u212aelvin.com" lower-cases to "mail.kelvin.com".
    with pytest.raises(PolicySyntaxError):
        parse_policy(enforce_with_mx(value))


POLICY_LINES = st.one_of(
    st.sampled_from(
        [
            "version: STSv1",
            "mode: enforce",
            "mode: none",
            "mx: mail.example.com",
            "mx: *.example.net",
            "mx: MAIL.Example.COM",
            "mx: mail.\u212aelvin.com",
            "max_age: 86400",
            "note: Grüße",
        ]
    ),
    st.builds(
        "{}:{}{}".format,
        st.sampled_from(["version", "mode", "mx", "max_age", "note", "Mode"]),
        WSP,
        st.one_of(
            with_lookalikes(st.builds(str, MX_VALUES)),
            st.text(alphabet="aZ09.*-_:;= \t\r\u00fc\u212a\x00", max_size=12),
        ),
    ),
)


@PROPERTY
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(st.tuples(POLICY_LINES, st.sampled_from(["\n", "\r\n", "\r", ""])), max_size=8)
        .map(lambda parts: "".join(line + term for line, term in parts))
        .map(lambda text: text.encode("utf-8")),
    )
)
def test_any_policy_body_keeps_the_invariants_and_reserialises(body: bytes) -> None:
    props.check_policy(body)


# --------------------------------------------------------------------------------------------------
# The tolerant reading (docs/policy-parsing.md): the strict language unchanged, the defects it
# accepts harmless, and nothing accepted that changes what a policy means.


@st.composite
def with_defects(draw: st.DrawFn, text: str) -> tuple[str, bool]:
    """``text`` with tolerated defects added at random; True when at least one was added."""
    lines = text.replace("\r\n", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    out: list[str] = []
    added = False
    for line in lines:
        if line.startswith("mx:") and draw(st.booleans()):
            # An mx written with the root's trailing dot, before any WSP after the value.
            value = line.rstrip(" \t")
            line = value + "." + line[len(value) :]
            added = True
        if draw(st.booleans()):
            line = draw(st.sampled_from([" ", "\t", "   "])) + line
            added = True
        if draw(st.integers(0, 4)) == 0:
            out.append(draw(st.sampled_from(["", " ", "\t "])))
            added = True
        if draw(st.integers(0, 5)) == 0:
            out.append(f"mx: {draw(st.sampled_from(['192.0.2.1', '[2001:db8::1]', '::1']))}")
            added = True
        out.append(line)
    ends = draw(st.sampled_from(["\n", "\r\n", "\r", "mixed"]))
    added |= ends == "\r"
    pieces = [
        line + (draw(st.sampled_from(["\n", "\r\n", "\r"])) if ends == "mixed" else ends)
        for line in out
    ]
    added |= any(piece.endswith("\r") for piece in pieces)
    body = "".join(pieces)
    if draw(st.booleans()):
        body = "\ufeff" + body
        added = True
    if draw(st.booleans()):
        body += "\n" * draw(st.integers(1, 3))
        added = True
    return body, added


@PROPERTY
@given(policy_texts())
def test_tolerant_reading_of_a_strictly_valid_policy_is_the_strict_reading(
    case: tuple[str, Policy],
) -> None:
    text, policy = case
    read = parse_policy(text, tolerant=True)
    assert read == parse_policy(text) == policy
    assert read.defects == ()


@PROPERTY
@given(st.data())
def test_adding_tolerated_defects_to_a_valid_policy_gives_the_same_policy(data: Any) -> None:
    text, policy = data.draw(policy_texts())
    defective, added = data.draw(with_defects(text))
    read = parse_policy(defective.encode("utf-8"), tolerant=True)
    assert read == policy
    assert bool(read.defects) == added
    if added:
        with pytest.raises(PolicySyntaxError):
            parse_policy(defective)


MEANING_CHANGES = [
    ("mode", ["enforced", "Enforce", "[testing]", "test", "off", "enforce;"]),
    ("version", ["STSv2", "STLS1", "stsv1", "STSv1.0"]),
    ("max_age", ["86400s", "-1", "1e5", "12345678901", "86 400", "one day"]),
]


@PROPERTY
@given(st.data())
def test_tolerant_reading_never_accepts_a_change_of_meaning(data: Any) -> None:
    text, policy = data.draw(policy_texts())
    lines = text.replace("\r\n", "\n").splitlines()
    key, values = data.draw(st.sampled_from([*MEANING_CHANGES, ("mx", [])]))
    if key == "mx":
        if policy.mode is Mode.NONE:
            return  # a none policy may have no mx
        # No mx left, or only IP addresses: nothing says which host names are allowed.
        kept = [line for line in lines if not line.startswith("mx:")]
        kept += ["mx: 192.0.2.7"] * data.draw(st.integers(0, 2))
    else:
        # The first field of a kind counts (§3.2): change that one.
        first = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
        kept = list(lines)
        kept[first] = f"{key}: {data.draw(st.sampled_from(values))}"
    changed = "\n".join(kept) + "\n"
    defective, _ = data.draw(with_defects(changed))
    for body in (changed, defective):
        for tolerant in (False, True):
            with pytest.raises(PolicySyntaxError):
                parse_policy(body, tolerant=tolerant)


@PROPERTY
@given(
    st.lists(
        st.tuples(
            st.one_of(POLICY_LINES, st.sampled_from(["mx: 10.0.0.1", "mx: a.example.", "  mx: b"])),
            st.sampled_from(["\n", "\r\n", "\r", "", "\n\n"]),
        ),
        max_size=8,
    ).map(lambda parts: "".join(line + term for line, term in parts)),
    st.booleans(),
)
def test_tolerant_reading_passes_only_host_names_as_mx(text: str, bom: bool) -> None:
    try:
        policy = parse_policy(("\ufeff" if bom else "") + text, tolerant=True)
    except PolicySyntaxError:
        return
    for mx in policy.mx:
        assert is_hostname(mx.domain)
        assert set(str(mx)) <= set("abcdefghijklmnopqrstuvwxyz0123456789.-*")


# --------------------------------------------------------------------------------------------------
# The configuration.

# Moderate values: what a postmaster writes. Ranges that config.py may tighten (issue 10, item 8:
# values that cannot work) are kept well inside what works.
SECONDS = st.one_of(st.floats(0.5, 60.0), st.integers(1, 60).map(float))
NAMES = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
PATHS = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=20).map(
    lambda text: "/" + text
)
LISTENERS = st.one_of(
    st.sampled_from(["systemd", "inet:127.0.0.1:8461", "inet:[::1]:8461", "inet:localhost:25"]),
    st.integers(0, 65535).map(lambda port: f"inet:127.0.0.1:{port}"),
    st.from_regex(r"/[a-z0-9/._-]{1,40}", fullmatch=True).map(lambda path: "unix:" + path),
)
MAP_NAMES = st.text(
    st.characters(exclude_categories=["Cs", "Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"]),
    min_size=1,
    max_size=12,
).filter(lambda name: name.isprintable() and ":" not in name and not any(c.isspace() for c in name))
PROFILES = st.builds(
    Profile, testing=st.sampled_from(["notfound", "may", "secure"]), tlsrpt=st.booleans()
)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    """A Config that load() accepts: every section, every key, valid values."""
    return Config(
        listen=tuple(draw(st.lists(LISTENERS, min_size=1, max_size=3))),
        server=config.ServerConfig(
            max_connections=draw(st.integers(1, 100000)),
            idle_timeout=draw(SECONDS),
            request_timeout=draw(SECONDS),
            socket_mode=draw(st.integers(0, 0o7777)),
            socket_owner=draw(NAMES),
            socket_group=draw(NAMES),
            user=draw(NAMES),
            group=draw(NAMES),
            pid_file=draw(PATHS),
        ),
        log=config.LogConfig(
            level=draw(st.sampled_from(["debug", "info", "warning", "error"])),
            syslog=draw(st.booleans()),
            syslog_facility=draw(st.sampled_from(sorted(SysLogHandler.facility_names))),
            file=draw(st.sampled_from(["", "/dev/null"])),
        ),
        dns=config.DnsConfig(
            nameservers=tuple(
                draw(
                    st.lists(
                        st.sampled_from(
                            ["192.0.2.53", "127.0.0.1:5353", "[2001:db8::53]:53", "::1"]
                        ),
                        max_size=3,
                    )
                )
            ),
            timeout=draw(SECONDS),
            lifetime=draw(SECONDS),
        ),
        https=config.HttpsConfig(
            # A real CA bundle: loading it is the check, and takes a while; not every time.
            ca_file=draw(st.sampled_from(["", "", "", certifi.where()])),
            timeout=draw(SECONDS),
            connect_timeout=draw(SECONDS),
            allow_private_addresses=draw(st.booleans()),
            proxy=draw(st.sampled_from(["", "http://proxy.example:3128", "https://[::1]:8080"])),
        ),
        cache=config.CacheConfig(
            backend=draw(st.sampled_from(["sqlite", "memory"])),
            path=draw(PATHS),
            txt_check_interval=draw(st.one_of(st.just(0.0), SECONDS)),
            refresh_interval=draw(SECONDS),
            unused_after=draw(SECONDS),
            no_record_ttl=draw(st.one_of(st.just(0.0), SECONDS)),
            fetch_retry_interval=draw(st.one_of(st.just(0.0), SECONDS)),
            first_lookup_deadline=draw(SECONDS),
        ),
        policy=draw(PROFILES),
        maps=draw(st.dictionaries(MAP_NAMES, PROFILES, max_size=3)),
        dane=config.DaneConfig(
            enabled=draw(st.booleans()),
            check_name=draw(st.one_of(st.just(""), DOMAINS)),
        ),
    )


@settings(PROPERTY, max_examples=150)
@given(configs())
def test_any_valid_config_dumps_to_text_that_loads_back_equal(settings_: Config) -> None:
    # check_config: loads(text) == settings_ here, and loads(dump()) of that again.
    assert props.check_config(dump(settings_)) == settings_


def _toml_float(value: float) -> str:
    return repr(value)  # "inf", "nan", "1e+16": TOML writes them the same way


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


TOML_SCALARS = st.one_of(
    st.booleans().map(lambda b: "true" if b else "false"),
    # TOML 1.0: integers are 64-bit.
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.floats().map(_toml_float),
    st.text(max_size=20).map(_toml_string),
    st.sampled_from(
        [
            '"systemd"',
            '"inet:127.0.0.1:8461"',
            '"unix:/run/x.sock"',
            '"0660"',
            '"/var/tmp/x"',
            '"mail"',
            '"may"',
            '"sqlite"',
            '"debug"',
            '"http://proxy.example:3128"',
            '"192.0.2.1"',
            '"[::1]:53"',
            '""',
            "1979-05-27T07:32:00Z",
            "07:32:00",
            "-inf",
            "1e400",
            "0x10",
            "'literal'",
        ]
    ),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(st.sampled_from(["a", "testing", "tlsrpt"]), inner), max_size=2).map(
            lambda pairs: "{" + ", ".join(f"{k} = {v}" for k, v in pairs) + "}"
        ),
    ),
    max_leaves=6,
)
SECTIONS = ("server", "log", "dns", "https", "cache", "policy", "dane")
TOML_KEYS = st.sampled_from(
    sorted(
        {"listen", "unknown", '"quoted key"', "maps"}
        | {f.name for f in dataclasses.fields(Config)}
        | {f.name for section in SECTIONS for f in dataclasses.fields(getattr(Config(), section))}
    )
)
TOML_HEADERS = st.one_of(
    st.sampled_from([*SECTIONS, "maps", "other", "server.sub", "[server]"]),
    NAMES.map(lambda name: "maps." + _toml_string(name)),
).map(lambda header: f"[{header}]")
TOML_LINES = st.one_of(
    TOML_HEADERS,
    st.tuples(TOML_KEYS, TOML_VALUES).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.text(max_size=15),
)


@settings(PROPERTY, max_examples=300)
@given(st.lists(TOML_LINES, max_size=12).map("\n".join))
def test_toml_ish_text_gives_a_config_or_a_config_error(text: str) -> None:
    props.check_config(text)


@pytest.mark.parametrize(
    "text",
    [
        # Found by this suite (issue 10): each raised OverflowError or RecursionError, not a
        # ConfigError, before config.py caught them.
        pytest.param("[server]\nidle_timeout = 1" + "0" * 400, id="integer-too-large-for-float"),
        pytest.param("listen = " + "[" * 2000 + "]" * 2000, id="arrays-nested-2000-deep"),
        pytest.param("listen = " + "{a = " * 2000 + "1" + "}" * 2000, id="tables-nested-deep"),
        # Found by fuzz_config.py: tomllib turns decimal digits into an int, and Python 3.11 refuses
        # more than 4300 of them with a ValueError.
        pytest.param("[server]\nidle_timeout = " + "9" * 5000, id="integer-of-5000-digits"),
        # Found by fuzz_config.py: listeners.parse_listener() read the port with int().
        pytest.param(
            'listen = ["inet:127.0.0.1:' + "1" * 4400 + '"]', id="listener-port-of-4400-digits"
        ),
    ],
)
def test_toml_that_python_parses_gives_a_config_or_a_config_error(text: str) -> None:
    props.check_config(text)


# --------------------------------------------------------------------------------------------------
# Linear time.


def _timed(func: Callable[[Any], object], arg: object, number: int, repeat: int) -> float:
    # The CPU time of this thread: what the call costs, whatever else the machine runs.
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        for _ in range(number):
            func(arg)
        best = min(best, time.thread_time() - start)
    return best


def growth(func: Callable[[Any], object], small: object, large: object) -> float:
    """How many times longer `func` takes on `large` than on `small`: a ratio, not a speed.

    Each is the CPU time of this thread in the best of five runs (the run least disturbed by the
    rest of the machine), with the garbage collector off, and each run repeats the call often
    enough to last a few milliseconds at the small size, so the clock's resolution does not matter.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        number = 1
        while number < 1 << 16 and _timed(func, small, number, 1) < 0.003:
            number *= 2
        return _timed(func, large, number, 5) / _timed(func, small, number, 5)
    finally:
        if enabled:
            gc.enable()


def attempt(parse: Callable[[Any], object], *errors: type[Exception]) -> Callable[[Any], None]:
    def call(arg: object) -> None:
        with contextlib.suppress(*errors):
            parse(arg)

    return call


def feed_in(size: int, limit: int = MAX_QUERY) -> Callable[[bytes], None]:
    """Feed a stream to a new Decoder in reads of `size` bytes."""

    def call(stream: bytes) -> None:
        decoder = Decoder(limit)
        try:
            for pos in range(0, len(stream), size):
                decoder.feed(stream[pos : pos + size])
        except NetstringError:
            pass

    return call


def take_one_at_a_time(stream: bytes) -> None:
    """Feed a stream in one read, then take its frames one a call, as a server that pauses."""
    decoder = Decoder()
    frames = decoder.feed(stream, 1)
    while frames:
        frames = decoder.feed(b"", 1)


def feed_one_frame_byte_by_byte(payload: bytes) -> None:
    feed_in(1, len(payload))(encode(payload))


HEAD = "version: STSv1\nmode: enforce\nmax_age: 86400\nmx: mail.example.com\n"
# One adversarial input family per line: (parser, n -> input, n). The input at 8n must take about
# 8 times as long as the input at n; n is chosen so that the old quadratic record parser took
# about a second at 8n.
LINEAR_CASES: list[tuple[str, Callable[[Any], object], Callable[[int], object], int]] = [
    ("netstring: empty frames in one read", feed_in(1 << 30), lambda n: b"0:," * n, 2000),
    ("netstring: frames byte by byte", feed_in(1), lambda n: b"3:abc," * n, 1000),
    ("netstring: frames in 64-byte reads", feed_in(64), lambda n: encode(b"x" * 95) * n, 200),
    ("netstring: one frame byte by byte", feed_one_frame_byte_by_byte, lambda n: b"x" * n, 2000),
    ("netstring: digits without a colon", feed_in(1), lambda n: b"1" * n, 2000),
    ("netstring: frames taken one at a time", take_one_at_a_time, lambda n: b"3:abc," * n, 1000),
    ("request: long key", attempt(parse_request), lambda n: b"m " + b"x" * n, 2000),
    (
        "request: non-ASCII key, control at the end",
        attempt(parse_request, NetstringError),
        lambda n: b"m " + "\u00e9".encode() * n + b"\x01",
        2000,
    ),
    ("request: not UTF-8", attempt(parse_request, NetstringError), lambda n: b"\xff" * n, 2000),
    ("key: U-labels", policy_domain, lambda n: "\u00fc" * n + ".com", 1250),
    ("key: many labels", policy_domain, lambda n: "a." * n + "com", 1250),
    ("key: hyphens", policy_domain, lambda n: "a-" * n, 1250),
    ("key: colons", policy_domain, lambda n: "1:" * n, 1250),
    ("key: ASCII port", policy_domain, lambda n: "example.com:" + "1" * n, 1250),
    ("key: Arabic-Indic port", policy_domain, lambda n: "example.com:" + "\u0661" * n, 1250),
    ("key: fullwidth", policy_domain, lambda n: "\uff41" * n + ".com", 1250),
    ("key: A-label prefixes", policy_domain, lambda n: "xn--" * n + ".com", 1250),
    ("key: brackets", policy_domain, lambda n: "[" * n + "]", 1250),
    (
        "record: WSP without a delimiter",
        attempt(parse_record, RecordSyntaxError),
        lambda n: "v=STSv1; id=1" + " \t" * n + "x",
        1000,
    ),
    (
        "record: WSP after the version",
        attempt(parse_record, RecordSyntaxError),
        lambda n: "v=STSv1" + " " * n,
        1000,
    ),
    (
        "record: delimiters",
        attempt(parse_record, RecordSyntaxError),
        lambda n: "v=STSv1" + ";" * n,
        1000,
    ),
    (
        "record: many fields",
        attempt(parse_record, RecordSyntaxError),
        lambda n: "v=STSv1" + "; e=x" * n + "; id=1",
        1000,
    ),
    (
        "record: long value",
        attempt(parse_record, RecordSyntaxError),
        lambda n: "v=STSv1; id=1; e=" + "x" * n,
        1000,
    ),
    ("policy: many mx lines", attempt(parse_policy), lambda n: HEAD + "mx: a.example\n" * n, 500),
    (
        "policy: spaces before a control character",
        attempt(parse_policy, PolicySyntaxError),
        lambda n: HEAD + "note: a" + " " * n + "\x01",
        2000,
    ),
    (
        "policy: WSP inside a value",
        attempt(parse_policy, PolicySyntaxError),
        lambda n: HEAD + "note: a" + " \t" * n + "b",
        2000,
    ),
    ("policy: CRs", attempt(parse_policy, PolicySyntaxError), lambda n: "\r" * n, 2000),
    ("policy: no colon", attempt(parse_policy, PolicySyntaxError), lambda n: "x" * n, 2000),
    (
        "policy: long mx",
        attempt(parse_policy, PolicySyntaxError),
        lambda n: HEAD + "mx: " + "a." * n + "com\n",
        2000,
    ),
    (
        "policy: repeated fields",
        attempt(parse_policy),
        lambda n: HEAD + "version: STSv1\n" * n,
        500,
    ),
    (
        "policy: wildcards",
        attempt(parse_policy, PolicySyntaxError),
        lambda n: HEAD + "mx: " + "*." * n + "a.example\n",
        2000,
    ),
    (
        "config: long listen array",
        attempt(loads, ConfigError),
        lambda n: "listen = [" + '"systemd", ' * n + "]",
        300,
    ),
    (
        "config: long string",
        attempt(loads, ConfigError),
        lambda n: '[server]\nuser = "' + "\\u00e9" * n + '"',
        1000,
    ),
    ("config: comment", attempt(loads, ConfigError), lambda n: "#" * n, 4000),
    (
        "config: many map tables",
        attempt(loads, ConfigError),
        lambda n: "".join(f'[maps.m{i}]\ntesting = "may"\n' for i in range(n)),
        250,
    ),
    ("config: many arrays of tables", attempt(loads, ConfigError), lambda n: "[[x]]\n" * n, 250),
    (
        "config: nameservers",
        attempt(loads, ConfigError),
        lambda n: "[dns]\nnameservers = [" + '"192.0.2.1", ' * n + "]",
        300,
    ),
]


@pytest.mark.parametrize(
    ("parse", "make", "n"),
    [pytest.param(*case[1:], id=case[0]) for case in LINEAR_CASES],
)
def test_no_input_makes_a_parser_take_more_than_linear_time(
    parse: Callable[[Any], object], make: Callable[[int], object], n: int
) -> None:
    """Growth, not speed: eight times the input may take about eight times as long (quadratic
    would be 64). The bound of 24 leaves room for a busy machine; no time is asserted."""
    ratio = growth(parse, make(n), make(8 * n))
    assert ratio < 24, f"8x the input took {ratio:.1f}x as long"


def test_dotted_keys_as_long_as_a_line_may_be_take_linear_time() -> None:
    """Growth, not speed, as above. tomllib checks every prefix of a dotted key ``a.a.a...``
    against the tables already defined, each from the top: quadratic in the number of parts of
    one key. config.loads refuses lines over MAX_LINE characters, so a line's cost is bounded
    and a file of such lines takes time linear in its size."""
    parts = (MAX_LINE - 10) // 2

    def keys(lines: int) -> str:
        return "".join(f"k{i}" + ".a" * parts + " = 1\n" for i in range(lines))

    assert all(len(line) <= MAX_LINE for line in keys(2).splitlines())
    ratio = growth(attempt(loads, ConfigError), keys(3), keys(24))
    assert ratio < 24, f"8x the input took {ratio:.1f}x as long"


def test_a_line_longer_than_max_line_is_refused() -> None:
    with pytest.raises(ConfigError, match=rf"^x.toml: line 2: longer than {MAX_LINE} characters"):
        loads("[dns]\na" + ".a" * MAX_LINE + " = 1\n", "x.toml")


@given(text=st.one_of(st.text(), st.binary()), limit=st.integers(min_value=3, max_value=400))
def test_printable_gives_one_bounded_line_of_printable_ascii(text: str | bytes, limit: int) -> None:
    shown = printable(text, limit)
    assert len(shown) <= limit
    assert all(" " <= ch <= "~" for ch in shown)
    whole = text.decode("latin-1") if isinstance(text, bytes) else text
    if len(whole) <= limit and all(" " <= ch <= "~" for ch in whole):
        assert shown == whole  # text that is already fit is shown as it is
