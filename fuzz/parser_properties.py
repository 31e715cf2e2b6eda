"""The properties of every parser that takes remote or client input, stated once.

The coverage-guided fuzzers next to this file (atheris) and tests/test_properties.py (hypothesis)
both call these checks, so both hold the parsers to the same rules. Each check takes one input,
runs the parser on it and raises `PropertyViolation` when a property does not hold; an exception
the parser must not raise goes through unchanged. Not "no crash" only:

- the parser raises nothing but its documented error;
- what it accepts re-serialises to text it reads back to the same value;
- an accepted host name or MX pattern is ASCII letters, digits, hyphens and dots, whatever Unicode
  case-folding would make of the input (characters are judged before lower-casing);
- where the grammar is small enough to state plainly (netstrings, socketmap requests, the TXT
  record), the parser agrees with a plain reference implementation on every input.

Linear time is not a property of one input; tests/test_properties.py measures growth.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from postfix_mtasts.config import Config, ConfigError, dump, loads
from postfix_mtasts.mtasts import (
    MAX_MAX_AGE,
    Mode,
    Policy,
    PolicySyntaxError,
    Record,
    RecordSyntaxError,
    is_hostname,
    is_sts_record,
    parse_policy,
    parse_record,
)
from postfix_mtasts.netstring import Decoder, FramingError, RequestError, encode, parse_request
from postfix_mtasts.postfix import policy_domain

__all__ = [
    "PropertyViolation",
    "check_config",
    "check_key",
    "check_netstring",
    "check_policy",
    "check_record",
    "check_request",
    "reference_decode",
    "reference_parse_record",
]

DOMAIN = "example.com"

# An accepted policy domain: lowercase ASCII labels of letters, digits and hyphens, two or more.
HOST_NAME = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)+")
# An accepted mx pattern as the policy would write it: a host name, or "*." and one.
MX_PATTERN = re.compile(r"(?:\*\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*")
# RFC 8461 §3.1 and §3.2, as the ABNF writes them (ASCII only).
RECORD_ID = re.compile(r"[A-Za-z0-9]{1,32}")
FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
RECORD_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
POLICY_FIELDS = ("version", "mode", "max_age", "mx")
# socketmap_table(5) requests: no C0 or C1 control character anywhere.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class PropertyViolation(AssertionError):
    """A parser broke one of the properties above; the message says which and on what."""


def require(condition: bool, message: str) -> None:
    # Not `assert`: the checks must hold under python -O as well.
    if not condition:
        raise PropertyViolation(message)


# --------------------------------------------------------------------------------------------------
# Netstrings and socketmap requests (client bytes).


def reference_decode(stream: bytes, max_length: int) -> tuple[list[bytes], int, bool]:
    """Netstrings read the plain way: (complete frames, bytes of an incomplete frame, failed).

    A length is ASCII digits without a leading zero, at most `max_length`, judged as soon as its
    digits are there; then ':', the payload and ','. `failed` means the stream is not netstrings.
    """
    frames: list[bytes] = []
    pos = 0
    size = len(stream)
    most_digits = len(str(max_length))
    while pos < size:
        end = pos
        while end < size and 0x30 <= stream[end] <= 0x39:
            end += 1
        digits = stream[pos:end]
        if len(digits) > 1 and digits[0] == 0x30:
            return frames, 0, True
        if len(digits) > most_digits or (digits and int(digits) > max_length):
            return frames, 0, True
        if end == size:
            return frames, size - pos, False
        if not digits or stream[end] != 0x3A:
            return frames, 0, True
        comma = end + 1 + int(digits)
        if comma >= size:
            return frames, size - pos, False
        if stream[comma] != 0x2C:
            return frames, 0, True
        frames.append(stream[end + 1 : comma])
        pos = comma + 1
    return frames, 0, False


def check_netstring(
    stream: bytes, chunk_sizes: Sequence[int], max_length: int, max_frames: int = 0
) -> list[bytes]:
    """Feed `stream` to a Decoder in chunks of `chunk_sizes` (the rest in one piece at the end),
    taking at most `max_frames` payloads a call (0: all) and the rest with ``feed(b"", n)``.

    The decoder yields what `reference_decode` yields, whatever the chunking and the batch size;
    once it has handed out every complete frame it holds no more than one frame of `max_length`
    plus its length and colon; it raises nothing but `FramingError`, and after one it refuses
    everything. Every frame is then a request for `check_request`. Returns the frames.
    """
    decoder = Decoder(max_length)
    bound = max_length + len(str(max_length)) + 1
    expected, incomplete, fails = reference_decode(stream, max_length)
    frames: list[bytes] = []
    pieces = []
    pos = 0
    for size in chunk_sizes:
        pieces.append(stream[pos : pos + max(size, 1)])
        pos += max(size, 1)
    pieces.append(stream[pos:])
    failed = False
    fed = 0
    for piece in pieces:
        fed += len(piece)
        try:
            batch = decoder.feed(piece, max_frames)
            while True:
                require(len(batch) <= (max_frames or len(batch)), f"{len(batch)} frames at once")
                frames.extend(batch)
                if len(batch) < max_frames or not max_frames:
                    break
                require(decoder.buffered <= fed, f"decoder holds {decoder.buffered} > {fed} fed")
                batch = decoder.feed(b"", max_frames)
        except FramingError:
            failed = True
            break
        require(decoder.buffered <= bound, f"decoder holds {decoder.buffered} > {bound} bytes")
    require(failed == fails, f"decoder failed={failed}, reference failed={fails}: {stream!r}")
    if failed:
        require(decoder.failed, "decoder not marked failed after a FramingError")
        require(frames == expected[: len(frames)], "frames before the error differ")
        try:
            decoder.feed(b"1:a,")
        except FramingError:
            pass
        else:
            raise PropertyViolation("a failed decoder accepted more bytes")
    else:
        require(frames == expected, f"frames {frames!r}, reference {expected!r}")
        require(decoder.buffered == incomplete, f"buffered {decoder.buffered} != {incomplete}")
    for frame in frames:
        require(Decoder(max_length).feed(encode(frame)) == [frame], "encode does not round-trip")
        check_request(frame)
    return frames


def check_request(payload: bytes) -> tuple[str, str] | None:
    """`parse_request` accepts exactly valid UTF-8 "NAME key" (both non-empty, no control
    character), and what it returns rebuilds the payload."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    name_part, space, key_part = (text or "").partition(" ")
    valid = bool(text and space and name_part and key_part and CONTROL.search(text) is None)
    try:
        name, key = parse_request(payload)
    except RequestError as exc:
        require(not valid, f"valid request refused ({exc.reason}): {payload!r}")
        require(exc.reason.isascii() and exc.reason.isprintable(), "reason not printable ASCII")
        return None
    require(valid, f"invalid request accepted: {payload!r}")
    require(" " not in name and bool(name) and bool(key), f"bad split {name!r} {key!r}")
    require(f"{name} {key}".encode() == payload, f"{name!r} {key!r} does not rebuild {payload!r}")
    return name, key


# --------------------------------------------------------------------------------------------------
# Lookup keys (client text).


def check_key(key: str) -> str | None:
    """`policy_domain` gives None or a lowercase ASCII host name that maps to itself.

    A domain comes only from a key that is not a parent probe or a literal next hop, whose port
    (if any) is ASCII digits; an ASCII key gives exactly its host part, lowercased, without the
    trailing dot: only U-labels are mapped (IDNA2008 with UTS #46), and only to A-labels.
    """
    domain = policy_domain(key)
    if domain is None:
        return None
    require(HOST_NAME.fullmatch(domain) is not None, f"{key!r} gave {domain!r}")
    require(is_hostname(domain), f"{key!r} gave {domain!r}, not a host name")
    require(
        policy_domain(domain) == domain, f"{key!r} gave {domain!r}, which does not map to itself"
    )
    require(not key.startswith((".", "[")), f"probe or literal {key!r} gave {domain!r}")
    host, colon, port = key.rpartition(":")
    if colon:
        require(port.isascii() and port.isdigit(), f"{key!r}: port {port!r} taken as a port")
    else:
        host = key
    if key.isascii():
        expected = host.lower().removesuffix(".")
        require(domain == expected, f"ASCII key {key!r} gave {domain!r}, not {expected!r}")
    return domain


# --------------------------------------------------------------------------------------------------
# The TXT record (remote text, from DNS).

# The grammar of RFC 8461 §3.1 as the first version of parse_record implemented it: one regular
# expression split. Plainly right but quadratic on long runs of WSP; keep the inputs short.
_REFERENCE_DELIM = re.compile(r"[ \t]*;[ \t]*")
REFERENCE_MAX = 1024


def reference_parse_record(text: str) -> Record | None:
    """The record `text` stands for under RFC 8461 §3.1, or None when it is not valid."""
    if not text.startswith("v=STSv1"):
        return None
    pieces = _REFERENCE_DELIM.split(text[len("v=STSv1") :])
    if pieces[0] != "":
        return None
    fields = pieces[1:]
    if fields and fields[-1] == "":
        fields.pop()
    record_id = None
    extensions = []
    for field in fields:
        name, eq, value = field.partition("=")
        if not eq or not name:
            return None
        if name == "id":
            if RECORD_ID.fullmatch(value) is None:
                return None
            record_id = record_id or value
        elif FIELD_NAME.fullmatch(name) and RECORD_EXT_VALUE.fullmatch(value):
            extensions.append((name, value))
        else:
            return None
    if record_id is None:
        return None
    return Record("STSv1", record_id, tuple(extensions))


def check_record(text: str) -> Record | None:
    """`parse_record` raises only `RecordSyntaxError`; it agrees with the reference (on inputs
    short enough for it); what it accepts is ASCII of the ABNF's alphabets and re-serialises to
    a record that parses back equal."""
    try:
        record = parse_record(text, DOMAIN)
    except RecordSyntaxError as exc:
        require(exc.domain == DOMAIN, "error does not name the domain")
        if len(text) <= REFERENCE_MAX:
            expected = reference_parse_record(text)
            require(expected is None, f"refused {text!r}, reference accepts {expected}")
        return None
    if len(text) <= REFERENCE_MAX:
        expected = reference_parse_record(text)
        require(record == expected, f"{text!r} parsed to {record}, reference {expected}")
    require(is_sts_record(text), f"accepted {text!r}, which is not an STS record")
    require(record.version == "STSv1", f"version {record.version!r}")
    require(RECORD_ID.fullmatch(record.id) is not None, f"id {record.id!r}")
    for name, value in record.extensions:
        require(name != "id" and FIELD_NAME.fullmatch(name) is not None, f"name {name!r}")
        require(RECORD_EXT_VALUE.fullmatch(value) is not None, f"value {value!r}")
    serialised = record.to_text()
    require(serialised.isascii() and is_sts_record(serialised), f"to_text {serialised!r}")
    again = parse_record(serialised, DOMAIN)
    require(again == record, f"{text!r} parsed to {record}, its text to {again}")
    require(again.to_text() == serialised, "to_text is not stable")
    return record


# --------------------------------------------------------------------------------------------------
# The policy (remote bytes, from HTTPS).


def _mx_values(text: str) -> list[str]:
    # The raw value of every "mx" line as served (RFC 8461 §3.2: LF or CRLF line ends).
    values = []
    for line in text.split("\n"):
        key, colon, value = line.removesuffix("\r").partition(":")
        if colon and key == "mx":
            values.append(value.strip(" \t"))
    return values


def check_policy(body: bytes | str) -> Policy | None:
    """`parse_policy` raises only `PolicySyntaxError`; an accepted policy keeps RFC 8461 §3.2's
    invariants, every mx pattern is the ASCII line as served (only ASCII letters lower-cased), and
    the policy re-serialises to text that parses back equal."""
    try:
        policy = parse_policy(body, DOMAIN)
    except PolicySyntaxError as exc:
        require(exc.domain == DOMAIN, "error does not name the domain")
        return None
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    require(policy.version == "STSv1", f"version {policy.version!r}")
    require(policy.mode in set(Mode), f"mode {policy.mode!r}")
    require(0 <= policy.max_age <= MAX_MAX_AGE, f"max_age {policy.max_age}")
    require(bool(policy.mx) or policy.mode is Mode.NONE, "no mx in an enforce or testing policy")
    raw = _mx_values(text)
    require(all(value.isascii() for value in raw), f"accepted a non-ASCII mx among {raw!r}")
    patterns = [str(mx) for mx in policy.mx]
    require(patterns == [value.lower() for value in raw], f"mx {raw!r} became {patterns!r}")
    for mx in policy.mx:
        require(MX_PATTERN.fullmatch(str(mx)) is not None, f"mx pattern {str(mx)!r}")
        require(is_hostname(mx.domain), f"mx domain {mx.domain!r} is not a host name")
    for name, value in policy.extensions:
        require(name not in POLICY_FIELDS and FIELD_NAME.fullmatch(name) is not None, name)
        require(value == value.strip(" \t"), f"value {value!r} keeps its surrounding WSP")
        require(re.search("[\x00-\x1f\x7f]", value) is None, f"control character in {value!r}")
    serialised = policy.to_text()
    again = parse_policy(serialised, DOMAIN)
    require(again == policy, f"policy {policy} re-parsed as {again}")
    require(parse_policy(serialised.encode("utf-8"), DOMAIN) == policy, "bytes round trip")
    require(again.to_text() == serialised, "to_text is not stable")
    return policy


# --------------------------------------------------------------------------------------------------
# The configuration (local text).


def check_config(text: str) -> Config | None:
    """`loads` returns a Config or raises `ConfigError`, nothing else; `dump` of what it
    returns loads back equal and dumps to the same text."""
    try:
        config = loads(text)
    except ConfigError:
        return None
    dumped = dump(config)
    again = loads(dumped)
    require(again == config, f"dump of {config} loads back as {again}")
    require(dump(again) == dumped, "dump is not stable")
    return config
