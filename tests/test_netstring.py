"""The netstring codec: strings in, values out."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postfix_mtasts import netstring
from postfix_mtasts.netstring import (
    MAX_QUERY,
    MAX_REASON,
    MAX_REPLY,
    Decoder,
    FrameTooLarge,
    FramingError,
    MalformedLength,
    MissingComma,
    NetstringError,
    ReplyError,
    RequestError,
    encode,
    encode_reply,
    parse_request,
    perm,
    temp,
)

# --- decoding --------------------------------------------------------------------------------

VALID_STREAMS = [
    (b"19:postfix example.com,", [b"postfix example.com"]),
    (b"0:,", [b""]),
    (b"1:,,", [b","]),
    (b"3:a:b,", [b"a:b"]),
    (b"5:\x00\xff\n ,,", [b"\x00\xff\n ,"]),
    (b"1:a,2:bc,3:def,", [b"a", b"bc", b"def"]),
    (b"%d:%s," % (MAX_QUERY, b"x" * MAX_QUERY), [b"x" * MAX_QUERY]),
    (b"", []),
    (b"1", []),
    (b"12:abc", []),
    (b"3:abc", []),
]


@pytest.mark.parametrize(("stream", "frames"), VALID_STREAMS)
def test_valid_stream_yields_its_frames(stream: bytes, frames: list[bytes]) -> None:
    assert Decoder().feed(stream) == frames


@pytest.mark.parametrize(("stream", "frames"), VALID_STREAMS)
def test_frames_are_the_same_when_fed_byte_by_byte(stream: bytes, frames: list[bytes]) -> None:
    decoder = Decoder()
    got: list[bytes] = []
    for i in range(len(stream)):
        got.extend(decoder.feed(stream[i : i + 1]))
    assert got == frames


INVALID_STREAMS = [
    (b":abc,", MalformedLength),
    (b"a:b,", MalformedLength),
    (b"abc", MalformedLength),
    (b"+3:abc,", MalformedLength),
    (b"-3:abc,", MalformedLength),
    (b" 3:abc,", MalformedLength),
    (b"3 :abc,", MalformedLength),
    (b"1_0:abcdefghij,", MalformedLength),
    (b"03:abc,", MalformedLength),
    (b"00:,", MalformedLength),
    (b"\xd9\xa3:abc,", MalformedLength),  # ARABIC-INDIC DIGIT THREE: a digit, but not ASCII
    (b"3:abc;", MissingComma),
    (b"3:abcd,", MissingComma),
    (b"3:ab,", []),  # incomplete, not yet wrong
    (b"0:x", MissingComma),
    (b"1:a,x", MalformedLength),
    (b"%d:" % (MAX_QUERY + 1), FrameTooLarge),
    (b"%d:%s," % (MAX_QUERY + 1, b"x" * (MAX_QUERY + 1)), FrameTooLarge),  # whole, in one read
    (b"99999999999999999999:", FrameTooLarge),
    (b"9" * 100, FrameTooLarge),
    (b"1" * 6, FrameTooLarge),
]


@pytest.mark.parametrize(("stream", "error"), INVALID_STREAMS)
def test_malformed_stream_is_a_framing_error(stream: bytes, error: object) -> None:
    decoder = Decoder()
    if error == []:
        assert decoder.feed(stream) == []
        return
    assert isinstance(error, type)
    with pytest.raises(error):
        decoder.feed(stream)
    assert decoder.failed


@pytest.mark.parametrize(("stream", "error"), [s for s in INVALID_STREAMS if s[1] != []])
def test_framing_error_is_found_when_fed_byte_by_byte(stream: bytes, error: type) -> None:
    decoder = Decoder()
    with pytest.raises(error):
        for i in range(len(stream)):
            decoder.feed(stream[i : i + 1])


def test_bad_length_is_refused_at_its_first_bad_byte() -> None:
    decoder = Decoder()
    assert decoder.feed(b"1") == []
    with pytest.raises(MalformedLength):
        decoder.feed(b"x")


def test_oversized_length_is_refused_before_its_payload_arrives() -> None:
    decoder = Decoder()
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"10001")
    assert info.value.length == 10001
    assert info.value.limit == MAX_QUERY
    assert "10001" in str(info.value)
    assert "10000" in str(info.value)


def test_length_digits_are_bounded_without_a_colon() -> None:
    decoder = Decoder()
    # Five digits could still be a valid length; a sixth cannot.
    assert decoder.feed(b"10000") == []
    assert decoder.buffered == 5
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"0")


def test_decoder_is_dead_after_a_framing_error() -> None:
    decoder = Decoder()
    with pytest.raises(MissingComma):
        decoder.feed(b"1:ab")
    with pytest.raises(FramingError):
        decoder.feed(b"1:a,")
    with pytest.raises(FramingError):
        decoder.feed(b"")


def test_pipelined_frames_in_one_feed_come_out_in_order() -> None:
    stream = b"".join(encode(b"postfix %d.example" % i) for i in range(50))
    frames = Decoder().feed(stream)
    assert frames == [b"postfix %d.example" % i for i in range(50)]


def test_incomplete_frame_is_kept_between_feeds() -> None:
    decoder = Decoder()
    assert decoder.feed(b"5:hel") == []
    assert decoder.buffered == 5
    assert decoder.feed(b"lo,3:a") == [b"hello"]
    assert decoder.buffered == 3
    assert decoder.feed(b"bc,") == [b"abc"]
    assert decoder.buffered == 0


def test_decoder_limit_is_configurable_for_replies() -> None:
    big = b"OK " + b"x" * (MAX_REPLY - 3)
    assert Decoder(max_length=MAX_REPLY).feed(encode(big)) == [big]
    with pytest.raises(FrameTooLarge):
        Decoder(max_length=MAX_REPLY).feed(b"%d:" % (MAX_REPLY + 1))


def test_every_error_is_a_netstring_error() -> None:
    framing: list[type[Exception]] = [MalformedLength, FrameTooLarge, MissingComma]
    for error in framing:
        assert issubclass(error, FramingError)
    for error in [FramingError, RequestError, ReplyError]:
        assert issubclass(error, NetstringError)
    assert not issubclass(RequestError, FramingError)


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_raise_nothing_but_netstring_errors(chunks: list[bytes]) -> None:
    decoder = Decoder()
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert len(frame) <= MAX_QUERY
                with contextlib.suppress(RequestError):
                    parse_request(frame)
    except NetstringError:
        assert decoder.failed


@given(st.binary(max_size=200).map(lambda b: b"1" + b), st.integers(min_value=1, max_value=8))
def test_random_bytes_after_a_digit_raise_nothing_but_netstring_errors(
    stream: bytes, step: int
) -> None:
    decoder = Decoder()
    try:
        for i in range(0, len(stream), step):
            decoder.feed(stream[i : i + step])
    except NetstringError:
        pass
    assert decoder.buffered <= MAX_QUERY + 7


@given(st.binary(max_size=MAX_QUERY))
def test_encode_then_decode_gives_the_payload_back(payload: bytes) -> None:
    assert Decoder().feed(encode(payload)) == [payload]


@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=10),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
)
def test_decoding_does_not_depend_on_where_the_stream_is_split(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode(p) for p in payloads)
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    decoder = Decoder()
    got: list[bytes] = []
    for start, end in itertools.pairwise(points):
        got.extend(decoder.feed(stream[start:end]))
    assert got == payloads
    assert decoder.buffered == 0


def test_encode_frames_a_payload() -> None:
    assert encode(b"postfix example.com") == b"19:postfix example.com,"
    assert encode(b"") == b"0:,"


# --- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"postfix example.com", ("postfix", "example.com")),
        (b"postfix [mx.example.org]:587", ("postfix", "[mx.example.org]:587")),
        (b"postfix a b c", ("postfix", "a b c")),
        (b"postfix  example.com", ("postfix", " example.com")),
        ("postfix bücher.example".encode(), ("postfix", "bücher.example")),
        (b"x .example.com", ("x", ".example.com")),
    ],
)
def test_request_is_split_at_the_first_space(payload: bytes, expected: tuple[str, str]) -> None:
    assert parse_request(payload) == expected


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not 'NAME key'"),
        (b"postfix", "not 'NAME key'"),
        (b" example.com", "empty map name"),
        (b"postfix ", "empty key"),
        (b"postfix exa\xffmple.com", "not valid UTF-8"),
        (b"postfix \xed\xa0\x80", "not valid UTF-8"),  # an encoded surrogate
        (b"postfix exa\x00mple.com", "control character"),
        (b"post\x00fix example.com", "control character"),
        (b"postfix example.com\n", "control character"),
        (b"postfix example.com\r", "control character"),
        (b"postfix example\x7f.com", "control character"),
        ("postfix example\x85.com".encode(), "control character"),
    ],
)
def test_bad_request_raises_request_error_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(payload)
    assert reason in info.value.reason
    assert info.value.reason.isascii()


# --- replies ---------------------------------------------------------------------------------


def test_reply_helpers_encode_postfix_replies() -> None:
    assert encode_reply("OK secure match=mx.example.net") == b"30:OK secure match=mx.example.net,"
    assert encode_reply("NOTFOUND ") == b"9:NOTFOUND ,"
    assert temp("dns timeout") == b"16:TEMP dns timeout,"
    assert perm("bad request") == b"16:PERM bad request,"


@pytest.mark.parametrize("data", ["", " ", "\t", "secure\x00", "secure\nmatch=x"])
def test_ok_refuses_empty_or_control_data(data: str) -> None:
    with pytest.raises(ReplyError):
        encode_reply("OK " + data)


def test_ok_at_the_reply_limit_is_sent_and_over_it_is_refused() -> None:
    data = "x" * (MAX_REPLY - 3)
    assert Decoder(MAX_REPLY).feed(encode_reply("OK " + data)) == [b"OK " + data.encode()]
    with pytest.raises(ReplyError):
        encode_reply("OK " + data + "x")
    with pytest.raises(ReplyError):
        encode_reply("OK " + "é" * (MAX_REPLY // 2))  # the limit is in bytes, not characters


def test_reasons_are_truncated_and_made_printable_ascii() -> None:
    payload = Decoder(MAX_REPLY).feed(temp("bücher\n\x00" + "y" * 10 * MAX_REASON))[0]
    assert payload.startswith(b"TEMP b?cher??yyy")
    assert len(payload) == len("TEMP ") + MAX_REASON
    assert all(0x20 <= c < 0x7F for c in payload)
    huge = perm("z" * (2 * MAX_REPLY))
    assert len(huge) < MAX_REPLY


@pytest.mark.parametrize(
    ("payload", "wire"),
    [
        ("OK secure match=.example.net", b"28:OK secure match=.example.net,"),
        ("NOTFOUND ", b"9:NOTFOUND ,"),
        ("TEMP policy fetch failed", b"24:TEMP policy fetch failed,"),
        ("TIMEOUT dns", b"11:TIMEOUT dns,"),
        ("PERM x\ny", b"8:PERM x?y,"),
        ("TEMP ", b"5:TEMP ,"),
    ],
)
def test_encode_reply_frames_a_full_reply(payload: str, wire: bytes) -> None:
    assert encode_reply(payload) == wire


@pytest.mark.parametrize(
    "payload",
    ["", "OK", "OK ", "OK  ", "NOTFOUND", "NOTFOUND x", "ok secure", "TEMP", "MAYBE x", "x" * 50],
)
def test_encode_reply_refuses_what_postfix_must_not_see(payload: str) -> None:
    with pytest.raises(ReplyError):
        encode_reply(payload)


def test_encode_reply_refuses_an_ok_over_the_reply_limit() -> None:
    with pytest.raises(ReplyError):
        encode_reply("OK " + "x" * MAX_REPLY)


def test_public_names_are_exported() -> None:
    for name in netstring.__all__:
        assert hasattr(netstring, name)


def test_feed_hands_out_at_most_max_frames_and_keeps_the_rest_as_bytes() -> None:
    decoder = Decoder()
    wire = b"".join(encode(f"postfix d{i}.example".encode()) for i in range(7)) + b"7:post"
    assert decoder.feed(wire, 3) == [f"postfix d{i}.example".encode() for i in range(3)]
    # Four complete frames and the start of a fifth wait, as the bytes that came.
    assert decoder.buffered == len(wire) - 3 * len(encode(b"postfix d0.example"))
    assert decoder.feed(b"", 3) == [f"postfix d{i}.example".encode() for i in range(3, 6)]
    assert decoder.feed(b"fix,", 3) == [b"postfix d6.example", b"postfix"]
    assert decoder.buffered == 0


@given(
    payloads=st.lists(st.binary(max_size=30), max_size=40),
    batch=st.integers(min_value=1, max_value=8),
    cut=st.integers(min_value=0, max_value=2000),
)
def test_taking_frames_in_batches_yields_every_frame_in_order(
    payloads: list[bytes], batch: int, cut: int
) -> None:
    wire = b"".join(encode(p) for p in payloads)
    decoder = Decoder()
    got = decoder.feed(wire[:cut], batch)
    assert len(got) <= batch
    rest = decoder.feed(wire[cut:], batch)
    assert len(rest) <= batch
    got += rest
    while True:
        more = decoder.feed(b"", batch)
        assert len(more) <= batch
        if not more:
            break
        got += more
    assert got == payloads
    assert decoder.buffered == 0
