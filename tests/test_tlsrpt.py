"""Exact replies with the TLSRPT attributes of Postfix 3.10 (issue 4), and DANE replies."""

from __future__ import annotations

import logging

import pytest

from postfix_mtasts import netstring
from postfix_mtasts.config import Profile
from postfix_mtasts.dane import DaneResult, DaneState, tlsa_usable
from postfix_mtasts.mtasts import parse_policy
from postfix_mtasts.netstring import MAX_REPLY
from postfix_mtasts.postfix import NOTFOUND, dane_reply, policy_reply

TLSRPT = Profile(testing="notfound", tlsrpt=True)

# RFC 8461 §3.2, the example policy.
RFC_EXAMPLE = (
    "version: STSv1\n"
    "mode: enforce\n"
    "mx: mail.example.com\n"
    "mx: *.example.net\n"
    "mx: backupmx.example.com\n"
    "max_age: 604800\n"
)


def reply(text: str, domain: str = "example.com", profile: Profile = TLSRPT) -> str:
    return policy_reply(parse_policy(text), profile, domain, text)


def test_rfc_example_policy_gets_every_tlsrpt_attribute_in_order() -> None:
    assert reply(RFC_EXAMPLE) == (
        "OK secure match=mail.example.com:.example.net:backupmx.example.com servername=hostname"
        " policy_type=sts policy_domain=example.com"
        " mx_host_pattern=mail.example.com mx_host_pattern=*.example.net"
        " mx_host_pattern=backupmx.example.com"
        " { policy_string = version: STSv1 } { policy_string = mode: enforce }"
        " { policy_string = mx: mail.example.com } { policy_string = mx: *.example.net }"
        " { policy_string = mx: backupmx.example.com } { policy_string = max_age: 604800 }"
    )


def test_without_tlsrpt_the_reply_has_no_attributes() -> None:
    assert reply(RFC_EXAMPLE, profile=Profile()) == (
        "OK secure match=mail.example.com:.example.net:backupmx.example.com servername=hostname"
    )


def test_wildcard_patterns_keep_the_star_form_while_match_uses_the_dot_form() -> None:
    text = "version: STSv1\nmode: enforce\nmx: *.a.example\nmx: *.a.example\nmax_age: 60\n"
    assert reply(text, "a.example") == (
        "OK secure match=.a.example servername=hostname policy_type=sts policy_domain=a.example"
        " mx_host_pattern=*.a.example mx_host_pattern=*.a.example"
        " { policy_string = version: STSv1 } { policy_string = mode: enforce }"
        " { policy_string = mx: *.a.example } { policy_string = mx: *.a.example }"
        " { policy_string = max_age: 60 }"
    )


def test_extension_lines_crlf_and_tabs_are_passed_as_policy_strings() -> None:
    text = "version: STSv1\r\nmode:\tenforce\r\nmx: m.example\r\nfoo: bar  baz \r\nmax_age: 1"
    assert reply(text, "example").endswith(
        " { policy_string = version: STSv1 } { policy_string = mode: enforce }"
        " { policy_string = mx: m.example } { policy_string = foo: bar  baz }"
        " { policy_string = max_age: 1 }"
    )


def test_a_line_with_braces_is_left_out() -> None:
    text = "version: STSv1\nmode: enforce\nmx: m.example\nnote: {x}\nother: a}b\nmax_age: 1\n"
    answer = reply(text, "example")
    assert "note" not in answer and "other" not in answer and "a}b" not in answer
    assert answer.endswith("{ policy_string = mx: m.example } { policy_string = max_age: 1 }")


def test_a_huge_policy_is_answered_without_policy_strings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    extensions = "".join(f"ext{i}: {'x' * 200}\n" for i in range(600))
    text = "version: STSv1\nmode: enforce\nmx: m.example\nmax_age: 1\n" + extensions
    with caplog.at_level(logging.WARNING):
        answer = reply(text, "example")
    assert answer == (
        "OK secure match=m.example servername=hostname policy_type=sts policy_domain=example"
        " mx_host_pattern=m.example"
    )
    assert "example: policy too large" in caplog.text
    # Just under the limit, the policy strings stay and the reply fits a socketmap reply.
    fits = "version: STSv1\nmode: enforce\nmx: m.example\nmax_age: 1\n" + "".join(
        f"ext{i}: {'x' * 200}\n" for i in range(400)
    )
    answer = reply(fits, "example")
    assert answer.count("policy_string") == 404
    assert len(netstring.encode_reply(answer)) <= MAX_REPLY + 10


def test_testing_policy_as_secure_carries_attributes_and_as_may_does_not() -> None:
    text = RFC_EXAMPLE.replace("enforce", "testing")
    secure = reply(text, profile=Profile(testing="secure", tlsrpt=True))
    assert secure.startswith("OK secure match=") and " policy_type=sts " in secure
    assert reply(text, profile=Profile(testing="may", tlsrpt=True)) == "OK may"
    assert reply(text, profile=Profile(testing="notfound", tlsrpt=True)) == NOTFOUND


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (DaneState.DANE_ONLY, "OK dane-only"),
        (DaneState.DANE, "OK dane"),
        (DaneState.NULL_MX, NOTFOUND),
        (DaneState.NONE, None),
    ],
)
def test_dane_verdicts_become_replies_without_tlsrpt_attributes(
    state: DaneState, expected: str | None
) -> None:
    assert dane_reply(DaneResult("example.com", state)) == expected


def test_a_temporary_dane_failure_is_a_temp_reply_naming_the_domain() -> None:
    answer = dane_reply(DaneResult("example.com", DaneState.TEMP, reason="MX: SERVFAIL"))
    assert answer == "TEMP DANE lookup for example.com failed: MX: SERVFAIL"


@pytest.mark.parametrize(
    ("usage", "selector", "mtype", "length", "usable"),
    [
        (3, 1, 1, 32, True),
        (2, 0, 2, 64, True),
        (3, 0, 0, 300, True),
        (3, 1, 1, 31, False),  # SHA-256 digest of the wrong length
        (3, 1, 2, 32, False),  # SHA-512 digest of the wrong length
        (3, 1, 0, 0, False),  # empty full data
        (0, 1, 1, 32, False),  # PKIX-TA: not for SMTP (RFC 7672 §3.1.3)
        (1, 1, 1, 32, False),  # PKIX-EE
        (3, 2, 1, 32, False),  # unknown selector
        (3, 1, 3, 32, False),  # unknown matching type
    ],
)
def test_tlsa_usability(usage: int, selector: int, mtype: int, length: int, usable: bool) -> None:
    assert tlsa_usable(usage, selector, mtype, b"\x01" * length) is usable
