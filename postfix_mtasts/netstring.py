"""The socketmap wire format: netstrings in, netstrings out, without I/O.

Hand-written rather than taken from a library: it is measurably faster on the hot path.

Postfix's socketmap client (socketmap_table(5)) frames every request and every reply as a
netstring, ``<decimal length>:<bytes>,``. A request payload is ``NAME key``; a reply payload is a
status word (``OK``, ``NOTFOUND``, ``TEMP``, ``TIMEOUT``, ``PERM``), a space and data.

This module is pure, in the manner of h11: a `Decoder` is fed bytes and hands back complete
frames, `encode`, `encode_reply` and the reply helpers turn payloads into bytes. No socket, no
clock. The limits are Postfix's own and are enforced where bytes enter: a length over the limit
is refused as soon as its digits are read, before any payload is buffered.

Errors form one small hierarchy. A `FramingError` means the byte stream itself is broken and the
connection must be closed: the decoder is dead afterwards. A `RequestError` means a whole frame
was read but its payload is not a request; the connection stays usable and the answer is
``PERM <reason>``.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_QUERY",
    "MAX_REASON",
    "MAX_REPLY",
    "Decoder",
    "FrameTooLarge",
    "FramingError",
    "MalformedLength",
    "MissingComma",
    "NetstringError",
    "ReplyError",
    "RequestError",
    "encode",
    "encode_reply",
    "parse_request",
    "perm",
    "temp",
]

# Postfix's socketmap_max_query_size (3.12): the longest request payload Postfix sends.
MAX_QUERY = 10000
# Postfix's socketmap_max_reply_size (default, configurable from 3.10): the longest reply
# payload Postfix accepts.
MAX_REPLY = 100000
# The longest reason in a TEMP or PERM reply: Postfix logs it, a postmaster reads it.
MAX_REASON = 200

_COLON = b":"
_COMMA = ord(",")
_ZERO = ord("0")

# C0 controls, DEL and C1 controls: never part of a map name, a key or a reply. NUL in
# particular would cut the string short inside Postfix.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NOT_PRINTABLE_ASCII = re.compile("[^\x20-\x7e]")

_NOTFOUND = b"9:NOTFOUND ,"
# Status words Postfix accepts in a reply, compared case-sensitively (dict_sockmap.c).
_REASON_STATUSES = frozenset({"TEMP", "TIMEOUT", "PERM"})


class NetstringError(Exception):
    """Base class of every error this module raises."""


class FramingError(NetstringError):
    """The byte stream is not a sequence of netstrings; the connection must be closed."""


class MalformedLength(FramingError):
    """The length prefix is not a plain decimal number (digits only, no leading zero)."""


class FrameTooLarge(FramingError):
    """The length prefix announces more bytes than the decoder's limit."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"netstring length {length} exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit


class MissingComma(FramingError):
    """The announced number of bytes is not followed by ','."""


class RequestError(NetstringError):
    """A complete frame whose payload is not a socketmap request; answer ``PERM <reason>``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReplyError(NetstringError):
    """A reply that must not be sent (empty ``OK``, over `MAX_REPLY`, unknown status): a bug."""


class Decoder:
    """Turns a byte stream into netstring payloads.

    `feed` takes whatever bytes arrived and returns the payloads of the frames they complete,
    in order, possibly none and possibly several (pipelining). Bytes of an incomplete frame are
    kept for the next call; `buffered` tells how many. The buffer is bounded: at most one frame
    of `max_length` bytes plus its framing, and, when the caller asks for at most `max_frames`
    payloads at a time, the complete frames beyond them, as bytes (no more than the caller fed:
    a server pauses reading until `feed(b"", n)` has taken them).

    After a `FramingError` the decoder is dead: every later `feed` raises `FramingError` too,
    since no frame boundary can be trusted any more. Payloads from the same `feed` call that
    preceded the error are dropped with it.
    """

    __slots__ = ("_buffer", "_failed", "_max_digits", "max_length")

    def __init__(self, max_length: int = MAX_QUERY) -> None:
        if max_length < 0:
            raise ValueError("max_length must not be negative")
        self.max_length = max_length
        # Without leading zeros, one digit more than the limit has is always over it: this
        # bounds what is buffered before the colon.
        self._max_digits = len(str(max_length))
        self._buffer = bytearray()
        self._failed: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back; 0 between frames."""
        return len(self._buffer)

    @property
    def failed(self) -> bool:
        """True once a `FramingError` was raised; the decoder accepts nothing more."""
        return self._failed is not None

    def feed(self, data: bytes, max_frames: int = 0) -> list[bytes]:
        """Add received bytes; return the payloads of the frames now complete, at most
        `max_frames` of them (0: all). Complete frames beyond those stay buffered, as bytes, for
        the next call; `feed(b"", n)` takes them without adding any."""
        if self._failed is not None:
            raise FramingError(f"decoder stopped after an earlier error: {self._failed}")
        buf: bytes | bytearray
        if self._buffer:
            self._buffer += data
            buf = self._buffer
        else:
            # The common case, one whole request per read: "<digits>:<payload>," exactly. Any
            # other shape, and any error, is left to the loop below (which records errors).
            colon = data.find(_COLON, 0, self._max_digits + 1)
            if colon > 0 and data[-1] == _COMMA:
                try:
                    whole = self._length(data[:colon]) == len(data) - colon - 2
                except FramingError:
                    whole = False
                if whole:
                    return [data[colon + 1 : -1]]
            buf = data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        max_digits = self._max_digits
        try:
            while pos < end:
                colon = buf.find(_COLON, pos, pos + max_digits + 1)
                if colon < 0:
                    # Judge the digits seen so far now rather than wait for a colon.
                    self._length(buf[pos : pos + max_digits + 1])
                    break
                length = self._length(buf[pos:colon])
                comma = colon + 1 + length
                if comma >= end:
                    break
                if buf[comma] != _COMMA:
                    raise MissingComma(f"netstring of {length} bytes is not followed by ','")
                frames.append(bytes(buf[colon + 1 : comma]))
                pos = comma + 1
                if len(frames) == max_frames:
                    break
        except FramingError as exc:
            self._failed = exc
            self._buffer = bytearray()
            raise
        if pos == end:
            if self._buffer:
                self._buffer = bytearray()
        elif buf is self._buffer:
            del self._buffer[:pos]
        else:
            self._buffer = bytearray(buf[pos:])
        return frames

    def _length(self, digits: bytes | bytearray) -> int:
        # Also called with the digits of a length whose colon has not arrived yet: every check
        # holds for a prefix too, so a bad length is refused at its first bad byte.
        if not digits:
            raise MalformedLength("netstring has no length before ':'")
        # bytes.isdigit() is ASCII-only; int() alone would also take '+', ' ' and '_'.
        if not digits.isdigit():
            raise MalformedLength("netstring length is not a decimal number")
        if len(digits) > 1 and digits[0] == _ZERO:
            raise MalformedLength("netstring length has a leading zero")
        length = int(digits)
        if length > self.max_length:
            raise FrameTooLarge(length, self.max_length)
        return length


def encode(payload: bytes) -> bytes:
    """Frame `payload` as one netstring."""
    return b"%d:%s," % (len(payload), payload)


def parse_request(payload: bytes) -> tuple[str, str]:
    """Split a request payload into (map name, key).

    The map name is everything before the first space and the key everything after it; both
    must be non-empty, the whole request valid UTF-8 without control characters. Raises
    `RequestError` with a short reason, meant for ``PERM <reason>``.
    """
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        raise RequestError("request is not valid UTF-8") from None
    name, space, key = text.partition(" ")
    if not space:
        raise RequestError("request is not 'NAME key'")
    if not name:
        raise RequestError("request has an empty map name")
    if not key:
        raise RequestError("request has an empty key")
    # For ASCII, isprintable() is exactly "no control character", and cheaper than the search.
    if not (text.isascii() and text.isprintable()) and _CONTROL.search(text) is not None:
        raise RequestError("request contains a control character")
    return name, key


def _reason(reason: str) -> str:
    # A reason may carry text from the outside world (an exception message, a domain): keep it
    # short and printable so it cannot break the reply or Postfix's log line.
    return _NOT_PRINTABLE_ASCII.sub("?", reason[:MAX_REASON])


def _ok(payload: str, data: str) -> bytes:
    # socketmap_table(5): an OK with empty data is a configuration error in Postfix.
    if not data or data.isspace():
        raise ReplyError("OK reply with empty data")
    if _CONTROL.search(data) is not None:
        raise ReplyError("OK reply data contains a control character")
    raw = payload.encode()
    if len(raw) > MAX_REPLY:
        raise ReplyError(f"OK reply of {len(raw)} bytes exceeds {MAX_REPLY} bytes")
    return b"%d:%s," % (len(raw), raw)


def temp(reason: str) -> bytes:
    """The reply ``TEMP <reason>``: Postfix defers the delivery. The reason is sanitised."""
    return encode(b"TEMP " + _reason(reason).encode())


def perm(reason: str) -> bytes:
    """The reply ``PERM <reason>``: a configuration error for Postfix. The reason is sanitised."""
    return encode(b"PERM " + _reason(reason).encode())


def encode_reply(payload: str) -> bytes:
    """Frame a complete reply payload such as ``OK secure match=...`` or ``NOTFOUND ``.

    ``OK`` data must be neither empty nor contain a control character, and the whole reply must
    fit `MAX_REPLY`; ``TEMP``, ``TIMEOUT`` and ``PERM`` reasons are sanitised as by `temp`.
    Anything else, or an ``OK`` that must not be sent, raises `ReplyError`.
    """
    status, space, data = payload.partition(" ")
    if status == "OK":
        return _ok(payload, data)
    if status == "NOTFOUND":
        if payload != "NOTFOUND ":
            raise ReplyError("NOTFOUND reply must be exactly 'NOTFOUND '")
        return _NOTFOUND
    if status in _REASON_STATUSES and space:
        return encode(f"{status} {_reason(data)}".encode())
    raise ReplyError(f"reply has no valid status word: {_reason(payload[:40])!r}")
