"""Endpoint notation: listeners, the client's socketmap endpoint and nameservers, one parser."""

from __future__ import annotations

import pytest

from postfix_mtasts.listeners import (
    InetListener,
    ListenerError,
    UnixListener,
    parse_endpoint,
    parse_listener,
    parse_nameserver,
)

# --- nameservers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("192.0.2.53:5353", ("192.0.2.53", 5353)),
        (" 127.0.0.1:53 ", ("127.0.0.1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("::1", ("::1", 53)),
        ("[2001:db8::53]", ("2001:db8::53", 53)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
        ("[::1]:1", ("::1", 1)),
        ("2001:DB8:0:0::53", ("2001:db8::53", 53)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ],
)
def test_nameserver_text_gives_address_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty address"),
        (":53", "empty address"),
        ("192.0.2.53:", "empty port"),
        ("192.0.2.53:dns", "not a number"),
        ("192.0.2.53:0", "out of range"),
        ("192.0.2.53:65536", "out of range"),
        ("192.0.2.53:+53", "not a number"),
        ("ns.example.org", "not an IP address"),
        ("ns.example.org:53", "not an IP address"),
        ("192.0.2.300", "not an IP address"),
        ("[2001:db8::53", "missing ']'"),
        ("[2001:db8::53]53", "expected ':PORT'"),
        ("[2001:db8::53]:", "empty port"),
        ("[192.0.2.53]:53", "only IPv6"),
        ("[ns.example.org]", "not an IPv6 address"),
        ("2001:db8::53:5353:1:2:3:4:5", "not an IP address"),
    ],
)
def test_malformed_nameserver_text_is_refused_with_the_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="nameserver") as raised:
        parse_nameserver(text)
    assert complaint in str(raised.value)
    assert repr(text) in str(raised.value)


# --- the client's endpoint (query --socketmap) -------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("inet:127.0.0.1:8461", InetListener("inet:127.0.0.1:8461", "127.0.0.1", 8461)),
        ("inet:[::1]:8461", InetListener("inet:[::1]:8461", "::1", 8461)),
        ("inet:localhost:25", InetListener("inet:localhost:25", "localhost", 25)),
        ("unix:/run/mtasts.sock", UnixListener("unix:/run/mtasts.sock", "/run/mtasts.sock")),
        ("unix:private/mtasts", UnixListener("unix:private/mtasts", "private/mtasts")),
    ],
)
def test_endpoint_is_parsed_as_listeners_are(spec: str, expected: object) -> None:
    assert parse_endpoint(spec) == expected


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("", "expected inet:HOST:PORT, inet:[ADDRESS]:PORT or unix:PATH"),
        ("systemd", "expected inet:HOST:PORT, inet:[ADDRESS]:PORT or unix:PATH"),
        ("unix:", "expected inet:HOST:PORT, inet:[ADDRESS]:PORT or unix:PATH"),
        ("tcp:127.0.0.1:8461", "expected inet:HOST:PORT, inet:[ADDRESS]:PORT or unix:PATH"),
        ("inet:127.0.0.1", "expected inet:HOST:PORT"),
        ("inet:::1:8461", "inet:[::1]:PORT"),
        ("inet:[::1]", "expected inet:[IPV6-ADDRESS]:PORT"),
        ("inet:127.0.0.1:99999", "not a number up to 65535"),
        ("inet::8461", "the host is missing"),
    ],
)
def test_bad_endpoint_is_refused_naming_it_and_why(spec: str, complaint: str) -> None:
    with pytest.raises(ListenerError) as raised:
        parse_endpoint(spec)
    assert f"socketmap endpoint {spec!r}" in str(raised.value)
    assert complaint in str(raised.value)


def test_listener_and_endpoint_read_an_address_alike() -> None:
    for spec in ("inet:127.0.0.1:8461", "inet:[2001:db8::1]:25", "inet:mail.example:0"):
        assert parse_endpoint(spec) == parse_listener(spec)
