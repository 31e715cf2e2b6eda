"""Unit tests of the RFC 8461 core, ``postfix_mtasts.mtasts``.

Parsing and matching are pure, so most tests are strings in and values out, in tables that follow
the ABNF of RFC 8461 §3.1 (the TXT record) and §3.2 (the policy) rule by rule, valid and invalid.
Discovery (``lookup_record``, ``fetch_policy``, ``get``) runs against two tiny in-test objects that
implement our own resolver and fetcher interfaces (``.txt(name)`` and ``.get(host, path)``) from a
table; the real DNS and HTTPS servers are exercised by the integration tests. Property-based tests
(hypothesis) check that no input makes the parsers raise anything but their documented errors, that
every valid policy parses to its own field values, and that MX matching agrees with a plain
reference implementation.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postfix_mtasts.fetch import CertificateError, FetchError, HTTPStatusError
from postfix_mtasts.mtasts import (
    MAX_MAX_AGE,
    MX,
    DNSError,
    Mode,
    MTASTSError,
    MultipleRecordsError,
    NoPolicyError,
    NoRecordError,
    Policy,
    PolicyFetchError,
    PolicySyntaxError,
    Record,
    RecordSyntaxError,
    Result,
    fetch_policy,
    get,
    is_hostname,
    is_sts_record,
    lookup_record,
    parse_policy,
    parse_record,
    tls_report_failure_reason,
    to_alabel,
)
from postfix_mtasts.resolver import DNSNotFound, DNSTemporaryError

POLICY_PATH = "/.well-known/mta-sts.txt"

# --------------------------------------------------------------------------------------------------
# Helpers.


def policy_text(*lines: str, term: str = "\n", final: bool = True) -> str:
    """A policy made of ``lines`` joined by ``term``, with or without the final terminator."""
    return term.join(lines) + (term if final else "")


BASE = ("version: STSv1", "mode: enforce", "mx: mail.example.com", "max_age: 86400")


def base_with(*extra: str) -> str:
    """The base enforce policy with ``extra`` lines appended."""
    return policy_text(*BASE, *extra)


def enforce_mx(*patterns: str) -> str:
    """A valid enforce policy whose mx lines are ``patterns``."""
    return policy_text(
        "version: STSv1", "mode: enforce", "max_age: 1", *(f"mx: {p}" for p in patterns)
    )


LABEL_63 = "a" * 63
NAME_253 = ".".join(["a" * 63] * 3 + ["b" * 61])  # 63*3 + 61 + 3 dots = 253
NAME_254 = NAME_253 + "b"  # still valid labels: only the length is wrong
assert len(NAME_253) == 253 and len(NAME_254) == 254


# --------------------------------------------------------------------------------------------------
# The value types.


def test_mode_is_a_str_enum_of_the_three_modes() -> None:
    assert [mode.value for mode in Mode] == ["enforce", "testing", "none"]
    assert isinstance(Mode.ENFORCE, str)
    assert str(Mode.ENFORCE) == "enforce"
    assert f"{Mode.TESTING}" == "testing"
    assert Mode("none") is Mode.NONE
    with pytest.raises(ValueError):
        Mode("Enforce")


@pytest.mark.parametrize(
    ("value", "field"),
    [
        pytest.param(MX(False, "mail.example.com"), "domain", id="MX"),
        pytest.param(Record("STSv1", "1"), "id", id="Record"),
        pytest.param(Policy("STSv1", Mode.NONE, (), 1), "mode", id="Policy"),
        pytest.param(Result(None, None, None, None), "error", id="Result"),
    ],
)
def test_values_are_frozen_and_hashable(value: object, field: str) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, None)
    assert hash(value) == hash(value)


def test_records_and_policies_without_extensions_have_an_empty_tuple() -> None:
    assert Record("STSv1", "1").extensions == ()
    assert Policy("STSv1", Mode.NONE, (), 1).extensions == ()


# --------------------------------------------------------------------------------------------------
# RFC 8461 §3.1: the TXT record.

EXT_VALUE_ALL = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "=;")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "v=STSv1; id=20160831085700Z", Record("STSv1", "20160831085700Z"), id="rfc-example"
        ),
        pytest.param("v=STSv1;id=1", Record("STSv1", "1"), id="no-wsp"),
        pytest.param("v=STSv1 ;id=1", Record("STSv1", "1"), id="space-before-delimiter"),
        pytest.param("v=STSv1\t;\tid=1", Record("STSv1", "1"), id="tabs-around-delimiter"),
        pytest.param(
            "v=STSv1  \t;  \t id=1", Record("STSv1", "1"), id="mixed-wsp-around-delimiter"
        ),
        pytest.param("v=STSv1; id=1;", Record("STSv1", "1"), id="trailing-delimiter"),
        pytest.param("v=STSv1; id=1; ", Record("STSv1", "1"), id="trailing-delimiter-and-space"),
        pytest.param(
            "v=STSv1; id=1 \t; \t",
            Record("STSv1", "1"),
            id="trailing-delimiter-with-wsp-both-sides",
        ),
        pytest.param("v=STSv1; id=" + "a" * 32, Record("STSv1", "a" * 32), id="id-32-chars"),
        pytest.param(
            "v=STSv1; id=AbC019xyZ", Record("STSv1", "AbC019xyZ"), id="id-mixed-case-and-digits"
        ),
        pytest.param(
            "v=STSv1; id=1; ext=value",
            Record("STSv1", "1", (("ext", "value"),)),
            id="extension-after-id",
        ),
        pytest.param(
            "v=STSv1; ext=value; id=1",
            Record("STSv1", "1", (("ext", "value"),)),
            id="extension-before-id",
        ),
        pytest.param(
            "v=STSv1; b=2; id=1; a=1",
            Record("STSv1", "1", (("b", "2"), ("a", "1"))),
            id="extensions-kept-in-order",
        ),
        pytest.param(
            "v=STSv1; id=1; 9x=1",
            Record("STSv1", "1", (("9x", "1"),)),
            id="extension-name-starts-with-digit",
        ),
        pytest.param(
            "v=STSv1; id=1; a_b-c.d=1",
            Record("STSv1", "1", (("a_b-c.d", "1"),)),
            id="extension-name-with-underscore-hyphen-dot",
        ),
        pytest.param(
            "v=STSv1; id=1; " + "n" * 32 + "=1",
            Record("STSv1", "1", (("n" * 32, "1"),)),
            id="extension-name-32-chars",
        ),
        pytest.param(
            "v=STSv1; id=1; ext=" + EXT_VALUE_ALL,
            Record("STSv1", "1", (("ext", EXT_VALUE_ALL),)),
            id="extension-value-every-allowed-char",
        ),
        pytest.param(
            # sts-ext-name allows "v" and other-case spellings of "id": they are extensions.
            "v=STSv1; v=STSv2; id=1",
            Record("STSv1", "1", (("v", "STSv2"),)),
            id="extension-named-v",
        ),
        pytest.param(
            "v=STSv1; ID=2; id=1",
            Record("STSv1", "1", (("ID", "2"),)),
            id="extension-named-uppercase-ID",
        ),
        pytest.param(
            # RFC 8461 §3.2 (its parsing rules cover both records): of a repeated field other than
            # "mx", the first counts.
            "v=STSv1; id=first; id=second",
            Record("STSv1", "first"),
            id="repeated-id-first-wins",
        ),
    ],
)
def test_parse_record_accepts_valid_records(text: str, expected: Record) -> None:
    assert parse_record(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("v=STSv1", id="version-only"),
        pytest.param("v=STSv1;", id="version-and-delimiter-only"),
        pytest.param("v=STSv1; ", id="version-delimiter-space-only"),
        pytest.param("v=STSv1 ", id="version-and-space"),
        pytest.param("V=STSv1; id=1", id="version-key-uppercase"),
        pytest.param("v=stsv1; id=1", id="version-value-lowercase"),
        pytest.param("v=STSV1; id=1", id="version-value-uppercase-V"),
        pytest.param("v=STSv2; id=1", id="version-2"),
        pytest.param("v=STSv10; id=1", id="version-prefix-of-longer"),
        pytest.param(" v=STSv1; id=1", id="leading-space"),
        pytest.param("\tv=STSv1; id=1", id="leading-tab"),
        pytest.param("v = STSv1; id=1", id="spaces-around-version-equals"),
        pytest.param("v=STSv1 id=1", id="missing-delimiter-after-version"),
        pytest.param("v=STSv1, id=1", id="comma-delimiter"),
        pytest.param("v=STSv1;; id=1", id="empty-field-after-version"),
        pytest.param("v=STSv1; ; id=1", id="empty-field-with-space"),
        pytest.param("v=STSv1; id=1;;", id="empty-field-at-end"),
        pytest.param("v=STSv1; id=1; ;", id="empty-field-at-end-with-space"),
        pytest.param("v=STSv1; id=1 ", id="trailing-space-without-delimiter"),
        pytest.param("v=STSv1; id=1\t", id="trailing-tab-without-delimiter"),
        pytest.param("v=STSv1; id=", id="id-empty"),
        pytest.param("v=STSv1; id=" + "a" * 33, id="id-33-chars"),
        pytest.param("v=STSv1; id=abc-def", id="id-with-hyphen"),
        pytest.param("v=STSv1; id=abc_def", id="id-with-underscore"),
        pytest.param("v=STSv1; id=abc.def", id="id-with-dot"),
        pytest.param("v=STSv1; id=a b", id="id-with-space"),
        pytest.param("v=STSv1; id=caf\xe9", id="id-non-ascii"),
        pytest.param("v=STSv1; id=1\x00", id="id-with-nul"),
        pytest.param("v=STSv1; id = 1", id="id-spaces-around-equals"),
        pytest.param("v=STSv1; ext=1", id="missing-id"),
        pytest.param("v=STSv1; ID=1", id="missing-id-only-uppercase-ID"),
        pytest.param("v=STSv1; id", id="id-without-equals"),
        pytest.param("v=STSv1; id=1; ext", id="extension-without-equals"),
        pytest.param("v=STSv1; id=1; =value", id="extension-empty-name"),
        pytest.param("v=STSv1; id=1; _ext=1", id="extension-name-starts-with-underscore"),
        pytest.param("v=STSv1; id=1; -ext=1", id="extension-name-starts-with-hyphen"),
        pytest.param("v=STSv1; id=1; .ext=1", id="extension-name-starts-with-dot"),
        pytest.param("v=STSv1; id=1; " + "n" * 33 + "=1", id="extension-name-33-chars"),
        pytest.param("v=STSv1; id=1; e+xt=1", id="extension-name-with-plus"),
        pytest.param("v=STSv1; id=1; \xe9xt=1", id="extension-name-non-ascii"),
        pytest.param("v=STSv1; id=1; ext=", id="extension-value-empty"),
        pytest.param("v=STSv1; id=1; ext=a=b", id="extension-value-with-equals"),
        pytest.param("v=STSv1; id=1; ext=a b", id="extension-value-with-space"),
        pytest.param("v=STSv1; id=1; ext=a\tb", id="extension-value-with-tab"),
        pytest.param("v=STSv1; id=1; ext=caf\xe9", id="extension-value-non-ascii"),
        pytest.param("v=STSv1; id=1; ext=a\x7f", id="extension-value-with-del"),
        pytest.param("v=STSv1; id=1; ext=a\x00", id="extension-value-with-nul"),
        pytest.param("v=STSv1; id=1; ext=a\nb", id="extension-value-with-newline"),
        # A later invalid "id" is still an invalid "id" field, not an extension named "id".
        pytest.param("v=STSv1; id=1; id=bad-id", id="repeated-id-invalid"),
    ],
)
def test_parse_record_rejects_invalid_records(text: str) -> None:
    with pytest.raises(RecordSyntaxError):
        parse_record(text)


def test_records_as_long_as_a_txt_record_can_be_are_judged_like_short_ones() -> None:
    # About 64 KiB of WSP: a delimiter's WSP, or WSP where no delimiter follows. (The first
    # parser split with a regular expression that took quadratic time on the second.)
    wsp = " \t" * 32000
    assert parse_record(f"v=STSv1;{wsp}id=1{wsp};{wsp}") == Record("STSv1", "1")
    with pytest.raises(RecordSyntaxError):
        parse_record(f"v=STSv1; id=1{wsp}x")
    with pytest.raises(RecordSyntaxError):
        parse_record(f"v=STSv1{wsp}")


def test_record_syntax_error_names_the_domain_and_the_record() -> None:
    with pytest.raises(RecordSyntaxError) as info:
        parse_record("v=STSv1; id=a-b", "example.com")
    assert info.value.domain == "example.com"
    assert str(info.value).startswith("example.com: invalid MTA-STS record (")
    assert "'a-b'" in str(info.value)
    assert "v=STSv1; id=a-b" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("v=STSv1;", True, id="version-and-delimiter"),
        pytest.param("v=STSv1; id=1", True, id="full-record"),
        pytest.param("v=STSv1 ; id=1", True, id="space-before-delimiter"),
        pytest.param("v=STSv1\t;id=1", True, id="tab-before-delimiter"),
        pytest.param("v=STSv1;;;", True, id="invalid-but-sts"),
        pytest.param("", False, id="empty"),
        pytest.param("v=STSv1", False, id="version-without-delimiter"),
        pytest.param("v=STSv1 id=1", False, id="version-and-space-without-delimiter"),
        pytest.param(" v=STSv1; id=1", False, id="leading-space"),
        pytest.param("V=STSv1; id=1", False, id="version-key-uppercase"),
        pytest.param("v=stsv1; id=1", False, id="version-value-lowercase"),
        pytest.param("v=STSv10; id=1", False, id="version-prefix-of-longer"),
        pytest.param("id=1; v=STSv1;", False, id="version-not-first"),
        pytest.param("v=spf1 -all", False, id="spf"),
        pytest.param("v=DMARC1; p=none", False, id="dmarc"),
        pytest.param("v=TLSRPTv1; rua=mailto:tlsrpt@example.com", False, id="tlsrpt"),
    ],
)
def test_is_sts_record_keeps_only_records_starting_with_the_version(
    text: str, expected: bool
) -> None:
    assert is_sts_record(text) is expected


# --------------------------------------------------------------------------------------------------
# RFC 8461 §3.2: the policy.


def enforce(*mx: MX, max_age: int = 86400, extensions: tuple[tuple[str, str], ...] = ()) -> Policy:
    return Policy("STSv1", Mode.ENFORCE, mx, max_age, extensions)


MAIL = MX(False, "mail.example.com")
RFC_EXAMPLE = policy_text(
    "version: STSv1",
    "mode: enforce",
    "mx: mail.example.com",
    "mx: *.example.net",
    "mx: backupmx.example.com",
    "max_age: 604800",
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            RFC_EXAMPLE,
            enforce(
                MAIL,
                MX(True, "example.net"),
                MX(False, "backupmx.example.com"),
                max_age=604800,
            ),
            id="rfc-example",
        ),
        pytest.param(policy_text(*BASE), enforce(MAIL), id="lf"),
        pytest.param(
            policy_text(*BASE, final=False), enforce(MAIL), id="lf-without-final-terminator"
        ),
        pytest.param(policy_text(*BASE, term="\r\n"), enforce(MAIL), id="crlf"),
        pytest.param(
            policy_text(*BASE, term="\r\n", final=False),
            enforce(MAIL),
            id="crlf-without-final-terminator",
        ),
        # RFC 8461 §3.2: sts-policy-term = LF / CRLF, each line on its own.
        pytest.param(
            "version: STSv1\r\nmode: enforce\nmx: mail.example.com\r\nmax_age: 86400\n",
            enforce(MAIL),
            id="mixed-lf-and-crlf",
        ),
        # sts-policy-field-delim = ":" *WSP; trailing *WSP after each field.
        pytest.param(
            policy_text(*(line.replace(": ", ":") for line in BASE)),
            enforce(MAIL),
            id="no-space-after-colon",
        ),
        pytest.param(
            policy_text(*(line.replace(": ", ":\t") for line in BASE)),
            enforce(MAIL),
            id="tab-after-colon",
        ),
        pytest.param(
            policy_text(*(line.replace(": ", ": \t  ") for line in BASE)),
            enforce(MAIL),
            id="spaces-and-tabs-after-colon",
        ),
        pytest.param(
            policy_text(*(line + " \t " for line in BASE)), enforce(MAIL), id="trailing-wsp"
        ),
        pytest.param(
            policy_text(*(line + " " for line in BASE), term="\r\n"),
            enforce(MAIL),
            id="trailing-space-before-crlf",
        ),
        pytest.param(
            policy_text(*(line + "\t" for line in BASE), final=False),
            enforce(MAIL),
            id="trailing-tab-at-end-of-text",
        ),
        pytest.param(policy_text(*reversed(BASE)), enforce(MAIL), id="any-field-order"),
        pytest.param(
            policy_text("version: STSv1", "mode: testing", "mx: mail.example.com", "max_age: 1"),
            Policy("STSv1", Mode.TESTING, (MAIL,), 1),
            id="mode-testing",
        ),
        pytest.param(
            policy_text("version: STSv1", "mode: none", "max_age: 1"),
            Policy("STSv1", Mode.NONE, (), 1),
            id="mode-none-without-mx",
        ),
        pytest.param(
            policy_text("version: STSv1", "mode: none", "mx: mail.example.com", "max_age: 1"),
            Policy("STSv1", Mode.NONE, (MAIL,), 1),
            id="mode-none-with-mx",
        ),
        pytest.param(
            policy_text(*BASE, "mx: *.example.net", "mx: mail.example.com"),
            enforce(MAIL, MX(True, "example.net"), MAIL),
            id="mx-repeats-in-policy-order",
        ),
        # RFC 8461 §3.2: only "mx" may repeat; of any other field the first counts. A later
        # line with a bad value still has the syntax of an extension field, so it is ignored.
        pytest.param(
            policy_text(*BASE, "mode: testing"), enforce(MAIL), id="repeated-mode-first-wins"
        ),
        pytest.param(
            policy_text(*BASE, "version: STSv2"), enforce(MAIL), id="repeated-version-first-wins"
        ),
        pytest.param(
            policy_text(*BASE, "max_age: 1"), enforce(MAIL), id="repeated-max-age-first-wins"
        ),
        pytest.param(
            policy_text(*BASE, "mode: bogus", "max_age: x"),
            enforce(MAIL),
            id="repeated-invalid-values-ignored",
        ),
        # Unknown fields are ignored for policy purposes, and kept as extensions.
        pytest.param(
            base_with("zeta: 1", "alpha: two words", "x.y-z_9: v", "zeta: 2"),
            enforce(
                MAIL,
                extensions=(("zeta", "1"), ("alpha", "two words"), ("x.y-z_9", "v"), ("zeta", "2")),
            ),
            id="unknown-fields-kept-in-order",
        ),
        pytest.param(
            base_with("note: a  b   c"),
            enforce(MAIL, extensions=(("note", "a  b   c"),)),
            id="extension-inner-spaces",
        ),
        pytest.param(
            base_with("note: a:b=c;d#e"),
            enforce(MAIL, extensions=(("note", "a:b=c;d#e"),)),
            id="extension-punctuation",
        ),
        pytest.param(
            base_with("note: Grüße aus Köln"),
            enforce(MAIL, extensions=(("note", "Grüße aus Köln"),)),
            id="extension-utf8-latin",
        ),
        pytest.param(
            base_with("note: 日本語 ✉ 😀"),
            enforce(MAIL, extensions=(("note", "日本語 ✉ 😀"),)),
            id="extension-utf8-cjk-symbols-emoji",
        ),
        pytest.param(
            base_with("note:  x  \t"),
            enforce(MAIL, extensions=(("note", "x"),)),
            id="extension-value-wsp-trimmed",
        ),
        pytest.param(
            base_with("9note: x"),
            enforce(MAIL, extensions=(("9note", "x"),)),
            id="extension-name-starts-with-digit",
        ),
        pytest.param(
            base_with("n" * 32 + ": x"),
            enforce(MAIL, extensions=(("n" * 32, "x"),)),
            id="extension-name-32-chars",
        ),
        # Keys are case-sensitive (%s in the ABNF): these are extensions, not the real fields.
        pytest.param(
            base_with("Mode: testing", "MX: other.example.com", "Max_Age: 1", "VERSION: x"),
            enforce(
                MAIL,
                extensions=(
                    ("Mode", "testing"),
                    ("MX", "other.example.com"),
                    ("Max_Age", "1"),
                    ("VERSION", "x"),
                ),
            ),
            id="keys-are-case-sensitive",
        ),
    ],
)
def test_parse_policy_accepts_valid_policies(text: str, expected: Policy) -> None:
    assert parse_policy(text) == expected
    assert parse_policy(text.encode("utf-8")) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("0", 0, id="zero"),
        pytest.param("1", 1, id="one"),
        pytest.param("86400", 86400, id="one-day"),
        pytest.param("0086400", 86400, id="leading-zeros"),
        pytest.param("31557599", 31557599, id="just-below-one-year"),
        pytest.param("31557600", 31557600, id="one-year"),
        pytest.param("31557601", MAX_MAX_AGE, id="one-year-plus-one-capped"),
        pytest.param("9999999999", MAX_MAX_AGE, id="ten-digits-capped"),
        pytest.param("0000000000", 0, id="ten-zeros"),
    ],
)
def test_max_age_is_parsed_and_capped_at_one_year(value: str, expected: int) -> None:
    text = policy_text("version: STSv1", "mode: none", f"max_age: {value}")
    assert parse_policy(text).max_age == expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        pytest.param("mail.example.com", MX(False, "mail.example.com"), id="hostname"),
        pytest.param("*.example.com", MX(True, "example.com"), id="wildcard"),
        pytest.param("MAIL.Example.COM", MX(False, "mail.example.com"), id="uppercase-lowercased"),
        pytest.param("*.EXAMPLE.com", MX(True, "example.com"), id="uppercase-wildcard-lowercased"),
        pytest.param("mx-1.example.com", MX(False, "mx-1.example.com"), id="inner-hyphen"),
        pytest.param("123.example.com", MX(False, "123.example.com"), id="numeric-first-label"),
        pytest.param("1.2.3.example", MX(False, "1.2.3.example"), id="numeric-labels-but-last"),
        pytest.param("localhost", MX(False, "localhost"), id="single-label"),
        pytest.param("*.com", MX(True, "com"), id="wildcard-over-tld"),
        pytest.param("xn--bcher-kva.example", MX(False, "xn--bcher-kva.example"), id="a-label"),
        pytest.param(
            "XN--BCHER-KVA.Example",
            MX(False, "xn--bcher-kva.example"),
            id="a-label-uppercase-lowercased",
        ),
        pytest.param(
            "*.xn--mnchen-3ya.example",
            MX(True, "xn--mnchen-3ya.example"),
            id="wildcard-over-a-label",
        ),
        pytest.param(
            "mx.xn--e1afmkfd.xn--80akhbyknj4f",
            MX(False, "mx.xn--e1afmkfd.xn--80akhbyknj4f"),
            id="a-labels-cyrillic",
        ),
        # An R-LDH label that is not an A-label: a valid RFC 5321 Domain label and a real
        # host name (e.g. r3---sn-x.googlevideo.com), just not an IDN.
        pytest.param(
            "r3---sn-ab5l6nzr.example.com",
            MX(False, "r3---sn-ab5l6nzr.example.com"),
            id="hyphens-in-3rd-and-4th-position-not-xn",
        ),
        pytest.param(LABEL_63 + ".example", MX(False, LABEL_63 + ".example"), id="label-63-chars"),
        pytest.param(NAME_253, MX(False, NAME_253), id="name-253-chars"),
        pytest.param("*." + NAME_253, MX(True, NAME_253), id="wildcard-over-253-chars"),
    ],
)
def test_mx_values_that_are_host_names_are_accepted(pattern: str, expected: MX) -> None:
    assert parse_policy(enforce_mx(pattern)).mx == (expected,)


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("bücher.example", id="u-label"),
        pytest.param("mail.bücher.example", id="u-label-inner"),
        pytest.param("*.bücher.example", id="u-label-wildcard"),
        pytest.param("192.0.2.1", id="ipv4"),
        pytest.param("[192.0.2.1]", id="ipv4-literal"),
        pytest.param("*.192.0.2.1", id="wildcard-over-ipv4"),
        pytest.param("mail.example.123", id="numeric-tld"),
        pytest.param("2001:db8::1", id="ipv6"),
        pytest.param("[IPv6:2001:db8::1]", id="ipv6-literal"),
        pytest.param("*", id="star-alone"),
        pytest.param("*.", id="star-dot-alone"),
        pytest.param("*example.com", id="star-without-dot"),
        pytest.param("**.example.com", id="double-star"),
        pytest.param("*.*.example.com", id="two-wildcard-labels"),
        pytest.param("a.*.example.com", id="inner-wildcard"),
        pytest.param("mail.*", id="trailing-wildcard"),
        pytest.param("mail*.example.com", id="partial-label-wildcard"),
        pytest.param(".example.com", id="leading-dot"),
        pytest.param("mail.example.com.", id="trailing-dot"),
        pytest.param("*.example.com.", id="wildcard-trailing-dot"),
        pytest.param("mail..example.com", id="empty-label"),
        pytest.param("-mail.example.com", id="label-leading-hyphen"),
        pytest.param("mail-.example.com", id="label-trailing-hyphen"),
        pytest.param("mail.-example.com", id="inner-label-leading-hyphen"),
        pytest.param("mail_1.example.com", id="underscore"),
        pytest.param("a" * 64 + ".example", id="label-64-chars"),
        pytest.param(NAME_254, id="name-254-chars"),
        pytest.param("mail.example.com:25", id="port"),
        pytest.param("a.com:b.com", id="injection-colon"),
        pytest.param("a.com servername=x", id="injection-space-attribute"),
        pytest.param("a.com,b.com", id="injection-comma"),
        pytest.param("a.com;b.com", id="injection-semicolon"),
        pytest.param("a.com/b", id="slash"),
        pytest.param("{x}", id="injection-braces"),
        pytest.param("a.com{x}", id="injection-braces-suffix"),
        pytest.param("${x}", id="injection-dollar-braces"),
        pytest.param("mail.example.com\\", id="backslash"),
        pytest.param("'mail.example.com'", id="quotes"),
        pytest.param("xn--zz.example", id="a-label-not-punycode"),
        pytest.param("xn--.example", id="a-label-prefix-only"),
        pytest.param("xn--bcher-kva-.example", id="a-label-trailing-hyphen"),
        pytest.param("xn--ls8h.example", id="a-label-idna2008-disallowed"),
        pytest.param("mail.ex\u0430mple.com", id="cyrillic-a-lookalike"),
        # Characters are judged before lower-casing: these fold to ASCII, but are not ASCII.
        pytest.param("mail.\u212aelvin.com", id="kelvin-sign-lowercases-to-k"),
        pytest.param("*.\u212aelvin.com", id="kelvin-sign-in-wildcard"),
        pytest.param("\u0130stanbul.example", id="capital-i-with-dot"),
        pytest.param("mail.\u017fecure.example", id="long-s-casefolds-to-s"),
        pytest.param("mail.\uff45xample.com", id="fullwidth-letter"),
        pytest.param("mail\u3002example.com", id="ideographic-full-stop"),
        pytest.param("mx\u0661.example.com", id="arabic-indic-digit"),
    ],
)
def test_mx_values_that_are_not_host_names_are_rejected(pattern: str) -> None:
    with pytest.raises(PolicySyntaxError):
        parse_policy(enforce_mx(pattern))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("\n", id="only-lf"),
        pytest.param("\r\n", id="only-crlf"),
        pytest.param(" ", id="only-space"),
        pytest.param("\n" + policy_text(*BASE), id="leading-blank-line"),
        pytest.param(policy_text(*BASE[:2], "", *BASE[2:]), id="blank-line-inside"),
        pytest.param(policy_text(*BASE) + "\n", id="two-final-lf"),
        pytest.param(policy_text(*BASE, term="\r\n") + "\r\n", id="two-final-crlf"),
        pytest.param(policy_text(*BASE[:2], " ", *BASE[2:]), id="line-of-spaces"),
        pytest.param(policy_text(*BASE[:2], "\t", *BASE[2:]), id="line-of-tab"),
        pytest.param(policy_text(*BASE, term="\r"), id="cr-line-ends"),
        pytest.param(policy_text(*BASE, final=False) + "\r", id="stray-cr-at-end"),
        pytest.param(policy_text(*BASE, term="\r\r\n"), id="cr-cr-lf"),
        pytest.param(policy_text(*BASE, term="\n\r"), id="lf-cr"),
        pytest.param(base_with("note: a\rb"), id="stray-cr-inside-value"),
        pytest.param(
            policy_text(*BASE[:3], "max_age: 86400\r", final=False), id="stray-cr-after-last-value"
        ),
        pytest.param(policy_text("mode : enforce", *BASE[:1], *BASE[2:]), id="space-before-colon"),
        pytest.param(policy_text("mode\t: enforce", *BASE[:1], *BASE[2:]), id="tab-before-colon"),
        pytest.param(policy_text(" mode: enforce", *BASE[:1], *BASE[2:]), id="leading-space"),
        pytest.param(policy_text("\tmode: enforce", *BASE[:1], *BASE[2:]), id="leading-tab"),
        pytest.param(policy_text("mode enforce", *BASE[:1], *BASE[2:]), id="no-colon"),
        pytest.param(
            policy_text("mode=enforce", *BASE[:1], *BASE[2:]), id="equals-instead-of-colon"
        ),
        pytest.param("\ufeff" + policy_text(*BASE), id="byte-order-mark"),
        pytest.param(base_with(": value"), id="empty-key"),
        pytest.param(base_with("_note: x"), id="key-starts-with-underscore"),
        pytest.param(base_with("-note: x"), id="key-starts-with-hyphen"),
        pytest.param(base_with(".note: x"), id="key-starts-with-dot"),
        pytest.param(base_with("n" * 33 + ": x"), id="key-33-chars"),
        pytest.param(base_with("nöte: x"), id="key-non-ascii"),
        pytest.param(base_with("no te: x"), id="key-with-space"),
        pytest.param(base_with("note:"), id="extension-empty-value"),
        pytest.param(base_with("note:   \t"), id="extension-only-wsp-value"),
        pytest.param(base_with("note: a\tb"), id="extension-value-with-tab"),
        pytest.param(base_with("note: a \t b"), id="extension-value-with-space-tab-space"),
        pytest.param(base_with("note: a\x00b"), id="extension-value-with-nul"),
        pytest.param(base_with("note: a\x7fb"), id="extension-value-with-del"),
        pytest.param(base_with("note: \x1b[31mred"), id="extension-value-with-escape"),
        pytest.param(base_with("note: a\x0bb"), id="extension-value-with-vertical-tab"),
        pytest.param(base_with("note: a\x0cb"), id="extension-value-with-form-feed"),
        pytest.param(base_with("note: \ud800"), id="extension-value-lone-surrogate"),
        pytest.param(
            policy_text("mode: enforce", "mx: mail.example.com", "max_age: 1"), id="missing-version"
        ),
        pytest.param(
            policy_text("version: STSv1", "mx: mail.example.com", "max_age: 1"), id="missing-mode"
        ),
        pytest.param(
            policy_text("version: STSv1", "mode: enforce", "mx: mail.example.com"),
            id="missing-max-age",
        ),
        pytest.param(
            policy_text("version: STSv1", "mode: enforce", "max_age: 1"), id="missing-mx-enforce"
        ),
        pytest.param(
            policy_text("version: STSv1", "mode: testing", "max_age: 1"), id="missing-mx-testing"
        ),
        pytest.param(
            policy_text("version: STSv1", "Mode: enforce", "mx: mail.example.com", "max_age: 1"),
            id="mode-key-capitalised-so-mode-missing",
        ),
        pytest.param(
            policy_text("Version: STSv1", "mode: enforce", "mx: mail.example.com", "max_age: 1"),
            id="version-key-capitalised-so-version-missing",
        ),
        pytest.param(
            policy_text("version: STSv1", "mode: enforce", "mx: mail.example.com", "Max_age: 1"),
            id="max-age-key-capitalised-so-max-age-missing",
        ),
        pytest.param(
            policy_text("version: STSv1", "mode: enforce", "MX: mail.example.com", "max_age: 1"),
            id="mx-key-uppercase-so-mx-missing",
        ),
        pytest.param(policy_text("version: stsv1", *BASE[1:]), id="version-lowercase"),
        pytest.param(policy_text("version: STSV1", *BASE[1:]), id="version-uppercase-v"),
        pytest.param(policy_text("version: STSv2", *BASE[1:]), id="version-2"),
        pytest.param(policy_text("version: STSv1 x", *BASE[1:]), id="version-with-trailing-word"),
        pytest.param(policy_text("version:", *BASE[1:]), id="version-empty"),
        pytest.param(policy_text(BASE[0], "mode: Enforce", *BASE[2:]), id="mode-capitalised"),
        pytest.param(policy_text(BASE[0], "mode: ENFORCE", *BASE[2:]), id="mode-uppercase"),
        pytest.param(policy_text(BASE[0], "mode: TESTING", *BASE[2:]), id="mode-testing-uppercase"),
        pytest.param(policy_text(BASE[0], "mode: None", "max_age: 1"), id="mode-none-capitalised"),
        pytest.param(policy_text(BASE[0], "mode: off", *BASE[2:]), id="mode-unknown"),
        pytest.param(policy_text(BASE[0], "mode: enforce testing", *BASE[2:]), id="mode-two-words"),
        pytest.param(policy_text(BASE[0], "mode: enforced", *BASE[2:]), id="mode-prefix"),
    ],
)
def test_parse_policy_rejects_invalid_policies(text: str) -> None:
    with pytest.raises(PolicySyntaxError):
        parse_policy(text)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("-1", id="negative"),
        pytest.param("+1", id="plus-sign"),
        pytest.param("1.5", id="decimal"),
        pytest.param("1e3", id="exponent"),
        pytest.param("0x10", id="hex"),
        pytest.param("1 2", id="inner-space"),
        pytest.param("1_000", id="underscore"),
        pytest.param("99999999999", id="eleven-digits"),
        pytest.param("00000000000", id="eleven-zeros"),
        pytest.param("31557600000", id="eleven-digits-year"),
        pytest.param("\u0663", id="arabic-indic-digit"),
        pytest.param("\uff11", id="fullwidth-digit"),
        pytest.param("one", id="word"),
    ],
)
def test_max_age_that_is_not_1_to_10_digits_is_rejected(value: str) -> None:
    with pytest.raises(PolicySyntaxError):
        parse_policy(policy_text("version: STSv1", "mode: none", f"max_age: {value}"))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xff", id="single-ff"),
        pytest.param(b"version: STSv1\nmode: none\nmax_age: 1\nnote: Gr\xfc\xdfe\n", id="latin-1"),
        pytest.param(
            b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xc3(\n", id="bad-continuation"
        ),
        pytest.param(b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xc0\xaf\n", id="overlong"),
        pytest.param(
            b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xed\xa0\x80\n", id="surrogate"
        ),
        pytest.param(
            b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xf4\x90\x80\x80\n", id="above-u10ffff"
        ),
        pytest.param(b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xe2\x82\n", id="truncated"),
        pytest.param("version: STSv1\nmode: none\nmax_age: 1\n".encode("utf-16"), id="utf-16"),
    ],
)
def test_policy_bytes_that_are_not_utf8_are_rejected(body: bytes) -> None:
    with pytest.raises(PolicySyntaxError) as info:
        parse_policy(body, "example.com")
    assert "UTF-8" in str(info.value)
    assert str(info.value).startswith("example.com: invalid policy (")


def test_policy_syntax_error_names_the_domain_and_the_line() -> None:
    with pytest.raises(PolicySyntaxError) as info:
        parse_policy(base_with("mx: a.com servername=x"), "example.com")
    assert info.value.domain == "example.com"
    assert str(info.value).startswith("example.com: invalid policy (line 5")
    assert "a.com servername=x" in str(info.value)


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        pytest.param(
            policy_text("mode: enforce", "mx: a.example", "max_age: 1"), '"version"', id="version"
        ),
        pytest.param(
            policy_text("version: STSv1", "mx: a.example", "max_age: 1"), '"mode"', id="mode"
        ),
        pytest.param(
            policy_text("version: STSv1", "mode: enforce", "mx: a.example"),
            '"max_age"',
            id="max-age",
        ),
        pytest.param(policy_text("version: STSv1", "mode: enforce", "max_age: 1"), '"mx"', id="mx"),
        pytest.param(
            policy_text("version: STSv1", "mode: Enforce", "max_age: 1"),
            "'Enforce'",
            id="mode-value",
        ),
        pytest.param(
            policy_text("version: STSv1", "mode: none", "max_age: 1x"), "'1x'", id="max-age-value"
        ),
    ],
)
def test_policy_syntax_error_says_what_is_missing_or_wrong(text: str, phrase: str) -> None:
    with pytest.raises(PolicySyntaxError) as info:
        parse_policy(text, "example.com")
    assert phrase in info.value.cause


# --------------------------------------------------------------------------------------------------
# RFC 8461 §4.1: MX host matching.

MATCH_POLICY = parse_policy(
    enforce_mx(
        "mail.example.com",
        "*.example.net",
        "mx.xn--bcher-kva.example",
        "*.xn--mnchen-3ya.example",
    )
)


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        pytest.param("mail.example.com", True, id="exact"),
        pytest.param("MAIL.Example.COM", True, id="case-insensitive"),
        pytest.param("mail.example.com.", True, id="trailing-dot"),
        pytest.param("MAIL.EXAMPLE.COM.", True, id="case-and-trailing-dot"),
        pytest.param("example.com", False, id="parent-of-exact"),
        pytest.param("other.example.com", False, id="sibling-of-exact"),
        pytest.param("xmail.example.com", False, id="prefix-of-exact"),
        pytest.param("a.mail.example.com", False, id="child-of-exact"),
        pytest.param("mail.example.com.evil", False, id="suffix-added"),
        pytest.param("a.example.net", True, id="wildcard-one-label"),
        pytest.param("A.Example.NET.", True, id="wildcard-case-and-trailing-dot"),
        pytest.param("mx-1.example.net", True, id="wildcard-hyphenated-label"),
        pytest.param("example.net", False, id="wildcard-not-bare-domain"),
        pytest.param("a.b.example.net", False, id="wildcard-not-two-labels"),
        pytest.param("aexample.net", False, id="wildcard-not-unseparated"),
        pytest.param(".example.net", False, id="wildcard-not-empty-label"),
        pytest.param("*.example.net", False, id="wildcard-literal-star"),
        pytest.param("mx.bücher.example", True, id="idn-u-label"),
        pytest.param("MX.Bücher.Example.", True, id="idn-u-label-case-and-trailing-dot"),
        pytest.param("mx.xn--bcher-kva.example", True, id="idn-a-label"),
        pytest.param("MX.XN--BCHER-KVA.EXAMPLE.", True, id="idn-a-label-uppercase"),
        pytest.param("mail.münchen.example", True, id="idn-wildcard-u-label"),
        pytest.param("ü.münchen.example", True, id="idn-wildcard-u-label-first-label"),
        pytest.param("münchen.example", False, id="idn-wildcard-not-bare-domain"),
        pytest.param("a.b.münchen.example", False, id="idn-wildcard-not-two-labels"),
        pytest.param("", False, id="invalid-empty"),
        pytest.param(".", False, id="invalid-dot"),
        pytest.param("mail..example.com", False, id="invalid-empty-label"),
        pytest.param("mail example.com", False, id="invalid-space"),
        pytest.param("mail.example.com:25", False, id="invalid-port"),
        pytest.param("-mail.example.com", False, id="invalid-leading-hyphen"),
        pytest.param("192.0.2.1", False, id="invalid-ipv4"),
        pytest.param("[192.0.2.1]", False, id="invalid-ipv4-literal"),
        pytest.param("bücher..example", False, id="invalid-idn-empty-label"),
    ],
)
def test_policy_matches(hostname: str, expected: bool) -> None:
    assert MATCH_POLICY.matches(hostname) is expected


def test_policy_without_mx_matches_nothing() -> None:
    policy = parse_policy(policy_text("version: STSv1", "mode: none", "max_age: 1"))
    assert not policy.matches("mail.example.com")


@pytest.mark.parametrize(
    ("mx", "text"),
    [
        pytest.param(MX(False, "mail.example.com"), "mail.example.com", id="hostname"),
        pytest.param(MX(True, "example.com"), "*.example.com", id="wildcard"),
        pytest.param(MX(False, "xn--bcher-kva.example"), "xn--bcher-kva.example", id="a-label"),
    ],
)
def test_mx_str_is_the_policy_pattern(mx: MX, text: str) -> None:
    assert str(mx) == text
    assert str(parse_policy(enforce_mx(text.upper())).mx[0]) == text


def test_record_to_text_is_the_published_form_and_parses_back() -> None:
    record = Record("STSv1", "20190429T010101", (("ext", "a"), ("b.c", "x:y")))
    assert record.to_text() == "v=STSv1; id=20190429T010101; ext=a; b.c=x:y"
    assert parse_record(record.to_text()) == record
    assert Record("STSv1", "1").to_text() == "v=STSv1; id=1"


def test_policy_to_text_is_one_field_a_line_and_parses_back() -> None:
    served = RFC_EXAMPLE.replace("\n", "\r\n").replace(": ", ":\t") + "note:  Grüße \r\n"
    policy = parse_policy(served)
    # The fields in a fixed order, LF line ends, one space after ":", as the RFC's example.
    assert policy.to_text() == RFC_EXAMPLE + "note: Grüße\n"
    assert parse_policy(policy.to_text()) == policy
    assert Policy("STSv1", Mode.NONE, (), 0).to_text() == "version: STSv1\nmode: none\nmax_age: 0\n"


# --------------------------------------------------------------------------------------------------
# Domains: U-labels or A-labels, any case, optional trailing dot; always the A-label form out.


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        pytest.param("example.com", "example.com", id="a-label-lowercase"),
        pytest.param("Example.COM", "example.com", id="mixed-case"),
        pytest.param("example.com.", "example.com", id="trailing-dot"),
        pytest.param("EXAMPLE.COM.", "example.com", id="uppercase-trailing-dot"),
        pytest.param("bücher.example", "xn--bcher-kva.example", id="u-label"),
        pytest.param("Bücher.Example", "xn--bcher-kva.example", id="u-label-mixed-case"),
        pytest.param(
            "BÜCHER.EXAMPLE.", "xn--bcher-kva.example", id="u-label-uppercase-trailing-dot"
        ),
        pytest.param("xn--bcher-kva.example", "xn--bcher-kva.example", id="a-label-idn"),
        pytest.param(
            "XN--BCHER-KVA.Example.",
            "xn--bcher-kva.example",
            id="a-label-idn-uppercase-trailing-dot",
        ),
        pytest.param(
            "münchen.xn--bcher-kva.example",
            "xn--mnchen-3ya.xn--bcher-kva.example",
            id="u-label-and-a-label-mixed",
        ),
        pytest.param("пример.испытание", "xn--e1afmkfd.xn--80akhbyknj4f", id="cyrillic"),
        pytest.param("faß.example", "xn--fa-hia.example", id="sharp-s-not-mapped-to-ss"),
        pytest.param("localhost", "localhost", id="single-label"),
        pytest.param(NAME_253, NAME_253, id="253-chars"),
        pytest.param(NAME_253 + ".", NAME_253, id="253-chars-and-trailing-dot"),
    ],
)
def test_to_alabel(domain: str, expected: str) -> None:
    assert to_alabel(domain) == expected


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param("", id="empty"),
        pytest.param(".", id="dot"),
        pytest.param("..", id="two-dots"),
        pytest.param("example..com", id="empty-label"),
        pytest.param(".example.com", id="leading-dot"),
        pytest.param("example.com..", id="two-trailing-dots"),
        pytest.param("exa mple.com", id="space"),
        pytest.param("-example.com", id="leading-hyphen"),
        pytest.param("example-.com", id="trailing-hyphen"),
        pytest.param("example_1.com", id="underscore"),
        pytest.param("example.com:25", id="port"),
        pytest.param("*.example.com", id="wildcard"),
        pytest.param("192.0.2.1", id="ipv4"),
        pytest.param("[192.0.2.1]", id="ipv4-literal"),
        pytest.param("a" * 64 + ".com", id="label-64-chars"),
        pytest.param(NAME_254, id="254-chars"),
        pytest.param("xn--zz.example", id="invalid-a-label"),
        pytest.param("bücher..example", id="u-label-empty-label"),
        pytest.param("i\u2764.example", id="idna2008-disallowed-symbol"),
        pytest.param("\ud800.example", id="lone-surrogate"),
        pytest.param("a\x00b.example", id="nul"),
    ],
)
def test_to_alabel_rejects_what_is_not_a_domain_name(domain: str) -> None:
    with pytest.raises(ValueError, match="not a valid domain name") as info:
        to_alabel(domain)
    assert repr(domain) in str(info.value)


# --------------------------------------------------------------------------------------------------
# Errors.

ERROR_PHRASES = [
    (NoRecordError, "no MTA-STS record"),
    (MultipleRecordsError, "more than one MTA-STS record"),
    (DNSError, "DNS lookup failed"),
    (RecordSyntaxError, "invalid MTA-STS record"),
    (NoPolicyError, "no policy served"),
    (PolicyFetchError, "policy fetch failed"),
    (PolicySyntaxError, "invalid policy"),
]
ERROR_IDS = [cls.__name__ for cls, _ in ERROR_PHRASES]


@pytest.mark.parametrize(("cls", "phrase"), ERROR_PHRASES, ids=ERROR_IDS)
def test_error_message_is_domain_phrase_and_cause(cls: type[MTASTSError], phrase: str) -> None:
    error = cls("example.com", "the cause")
    assert str(error) == f"example.com: {phrase} (the cause)"
    assert error.domain == "example.com"
    assert error.cause == "the cause"
    assert isinstance(error, MTASTSError)
    assert isinstance(error, Exception)


def test_error_hierarchy() -> None:
    classes = [cls for cls, _ in ERROR_PHRASES]
    for cls in classes:
        assert issubclass(cls, MTASTSError)
        for other in classes:
            related = cls is other or (cls is NoPolicyError and other is PolicyFetchError)
            assert issubclass(cls, other) is related, (cls, other)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        pytest.param(NoRecordError("example.com", "x"), "", id="NoRecordError"),
        pytest.param(MultipleRecordsError("example.com", "x"), "", id="MultipleRecordsError"),
        pytest.param(DNSError("example.com", "x"), "", id="DNSError"),
        pytest.param(RecordSyntaxError("example.com", "x"), "", id="RecordSyntaxError"),
        pytest.param(
            NoPolicyError("example.com", "x"), "sts-policy-fetch-error", id="NoPolicyError"
        ),
        pytest.param(
            PolicyFetchError("example.com", "x"), "sts-policy-fetch-error", id="PolicyFetchError"
        ),
        pytest.param(
            PolicyFetchError("example.com", "x", webpki=True),
            "sts-webpki-invalid",
            id="PolicyFetchError-webpki",
        ),
        pytest.param(
            PolicySyntaxError("example.com", "x"), "sts-policy-invalid", id="PolicySyntaxError"
        ),
        pytest.param(ValueError("x"), "", id="ValueError"),
        pytest.param(OSError("x"), "", id="OSError"),
    ],
)
def test_tls_report_failure_reason(error: BaseException, reason: str) -> None:
    assert tls_report_failure_reason(error) == reason


# --------------------------------------------------------------------------------------------------
# Discovery through our resolver and fetcher interfaces.


class TableResolver:
    """A resolver answering TXT queries from a table: records, or an exception to raise.

    A name not in the table does not exist. Every query is kept in ``queries``.
    """

    def __init__(self, table: dict[str, list[str] | Exception]) -> None:
        self.table = table
        self.queries: list[str] = []

    def txt(self, name: str) -> list[str]:
        self.queries.append(name)
        answer = self.table.get(name, DNSNotFound(f"{name} TXT: NXDOMAIN"))
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


class TableFetcher:
    """A fetcher answering from a table of host to body, or an exception to raise.

    A host not in the table serves HTTP 404. Every request is kept in ``requests``.
    """

    def __init__(self, table: dict[str, bytes | Exception]) -> None:
        self.table = table
        self.requests: list[tuple[str, str]] = []

    def get(self, host: str, path: str = POLICY_PATH, *, ipv4: object = None) -> bytes:
        self.requests.append((host, path))
        answer = self.table.get(host, http_status(f"https://{host}{path}", 404))
        if isinstance(answer, Exception):
            raise answer
        return answer


def http_status(url: str, status: int) -> HTTPStatusError:
    return HTTPStatusError(f"{url}: HTTP {status}", status)


RECORD_TEXT = "v=STSv1; id=20240101T000000"
POLICY_BODY = policy_text(*BASE, term="\r\n").encode("utf-8")


def test_lookup_record_returns_the_record_and_its_text() -> None:
    resolver = TableResolver({"_mta-sts.example.com": [RECORD_TEXT]})
    assert lookup_record("example.com", resolver) == (
        Record("STSv1", "20240101T000000"),
        RECORD_TEXT,
    )
    assert resolver.queries == ["_mta-sts.example.com"]


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param("Bücher.Example.", id="u-label"),
        pytest.param("xn--bcher-kva.example", id="a-label"),
        pytest.param("XN--BCHER-KVA.EXAMPLE.", id="a-label-uppercase-trailing-dot"),
    ],
)
def test_lookup_record_queries_the_a_label_form(domain: str) -> None:
    resolver = TableResolver({"_mta-sts.xn--bcher-kva.example": [RECORD_TEXT]})
    record, _ = lookup_record(domain, resolver)
    assert record.id == "20240101T000000"
    assert resolver.queries == ["_mta-sts.xn--bcher-kva.example"]


def test_lookup_record_ignores_txt_records_that_are_not_sts() -> None:
    others = ["v=spf1 -all", "google-site-verification=abc", "v=STSv1 id=2", " v=STSv1; id=3"]
    resolver = TableResolver({"_mta-sts.example.com": [*others[:2], RECORD_TEXT, *others[2:]]})
    assert lookup_record("example.com", resolver)[1] == RECORD_TEXT


@pytest.mark.parametrize(
    "records",
    [
        pytest.param([], id="no-records"),
        pytest.param(["v=spf1 -all"], id="only-other-records"),
        pytest.param(["v=STSv1 id=1", "V=STSv1; id=1", "v=STSv10; id=1"], id="only-near-misses"),
    ],
)
def test_lookup_record_without_sts_record_is_no_record(records: list[str]) -> None:
    resolver = TableResolver({"_mta-sts.example.com": records})
    with pytest.raises(NoRecordError) as info:
        lookup_record("example.com", resolver)
    assert str(info.value).startswith("example.com: no MTA-STS record (_mta-sts.example.com")


@pytest.mark.parametrize(
    "records",
    [
        pytest.param(["v=STSv1; id=1", "v=STSv1; id=2"], id="two-ids"),
        pytest.param(["v=STSv1; id=1", "v=STSv1; id=1"], id="identical"),
        pytest.param(["v=STSv1; id=1", "v=STSv1;"], id="one-invalid"),
        pytest.param(["v=STSv1;", "v=STSv1 ; bad"], id="both-invalid"),
        pytest.param(
            ["v=spf1 -all", "v=STSv1; id=1", "v=STSv1; id=2", "v=STSv1; id=3"],
            id="three-among-others",
        ),
    ],
)
def test_lookup_record_with_several_sts_records_is_multiple_records(records: list[str]) -> None:
    resolver = TableResolver({"_mta-sts.example.com": records})
    with pytest.raises(MultipleRecordsError) as info:
        lookup_record("example.com", resolver)
    assert info.value.domain == "example.com"
    assert str(info.value).startswith("example.com: more than one MTA-STS record (")


def test_lookup_record_with_invalid_record_is_record_syntax_error() -> None:
    resolver = TableResolver({"_mta-sts.example.com": ["v=spf1 -all", "v=STSv1; id=a-b"]})
    with pytest.raises(RecordSyntaxError) as info:
        lookup_record("example.com", resolver)
    assert str(info.value).startswith("example.com: invalid MTA-STS record (")


@pytest.mark.parametrize(
    ("dns_error", "error_class", "phrase"),
    [
        pytest.param(
            DNSNotFound("_mta-sts.example.com TXT: NXDOMAIN"),
            NoRecordError,
            "no MTA-STS record",
            id="nxdomain",
        ),
        pytest.param(
            DNSNotFound("_mta-sts.example.com TXT: no TXT record"),
            NoRecordError,
            "no MTA-STS record",
            id="nodata",
        ),
        pytest.param(
            DNSTemporaryError("_mta-sts.example.com TXT: SERVFAIL"),
            DNSError,
            "DNS lookup failed",
            id="servfail",
        ),
        pytest.param(
            DNSTemporaryError("_mta-sts.example.com TXT: timed out after 5.0s"),
            DNSError,
            "DNS lookup failed",
            id="timeout",
        ),
    ],
)
def test_lookup_record_dns_failures_are_chained(
    dns_error: Exception, error_class: type[MTASTSError], phrase: str
) -> None:
    resolver = TableResolver({"_mta-sts.example.com": dns_error})
    with pytest.raises(error_class) as info:
        lookup_record("Example.COM.", resolver)
    assert str(info.value) == f"example.com: {phrase} ({dns_error})"
    assert info.value.__cause__ is dns_error


def test_lookup_record_rejects_an_invalid_domain_without_querying() -> None:
    resolver = TableResolver({})
    with pytest.raises(ValueError):
        lookup_record("exa mple.com", resolver)
    assert resolver.queries == []


def test_fetch_policy_returns_the_policy_and_its_text_as_served() -> None:
    fetcher = TableFetcher({"mta-sts.example.com": POLICY_BODY})
    policy, text = fetch_policy("example.com", fetcher)
    assert policy == enforce(MAIL)
    assert text == POLICY_BODY.decode("utf-8")
    assert "\r\n" in text
    assert fetcher.requests == [("mta-sts.example.com", POLICY_PATH)]


def test_fetch_policy_fetches_from_the_a_label_host() -> None:
    fetcher = TableFetcher({"mta-sts.xn--bcher-kva.example": POLICY_BODY})
    policy, _ = fetch_policy("BÜCHER.example.", fetcher)
    assert policy.mode is Mode.ENFORCE
    assert fetcher.requests == [("mta-sts.xn--bcher-kva.example", POLICY_PATH)]


def test_fetch_policy_keeps_utf8_extension_values() -> None:
    body = base_with("note: Grüße").encode("utf-8")
    policy, text = fetch_policy("example.com", TableFetcher({"mta-sts.example.com": body}))
    assert policy.extensions == (("note", "Grüße"),)
    assert text.endswith("note: Grüße\n")


URL = "https://mta-sts.example.com/.well-known/mta-sts.txt"


@pytest.mark.parametrize(
    ("fetch_error", "error_class", "phrase", "reason"),
    [
        pytest.param(
            http_status(URL, 404),
            NoPolicyError,
            "no policy served",
            "sts-policy-fetch-error",
            id="404",
        ),
        pytest.param(
            http_status(URL, 500),
            PolicyFetchError,
            "policy fetch failed",
            "sts-policy-fetch-error",
            id="500",
        ),
        pytest.param(
            http_status(URL, 301),
            PolicyFetchError,
            "policy fetch failed",
            "sts-policy-fetch-error",
            id="redirect",
        ),
        pytest.param(
            http_status(URL, 410),
            PolicyFetchError,
            "policy fetch failed",
            "sts-policy-fetch-error",
            id="410",
        ),
        pytest.param(
            CertificateError(f"{URL}: certificate has expired"),
            PolicyFetchError,
            "policy fetch failed",
            "sts-webpki-invalid",
            id="certificate",
        ),
        pytest.param(
            FetchError(f"{URL}: media type text/html, expected text/plain"),
            PolicyFetchError,
            "policy fetch failed",
            "sts-policy-fetch-error",
            id="media-type",
        ),
        pytest.param(
            FetchError(f"{URL}: larger than 65536 bytes"),
            PolicyFetchError,
            "policy fetch failed",
            "sts-policy-fetch-error",
            id="too-large",
        ),
    ],
)
def test_fetch_policy_failures_are_chained(
    fetch_error: Exception, error_class: type[MTASTSError], phrase: str, reason: str
) -> None:
    fetcher = TableFetcher({"mta-sts.example.com": fetch_error})
    with pytest.raises(PolicyFetchError) as info:
        fetch_policy("example.com", fetcher)
    assert type(info.value) is error_class
    assert str(info.value) == f"example.com: {phrase} ({fetch_error})"
    assert info.value.__cause__ is fetch_error
    assert tls_report_failure_reason(info.value) == reason


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"<html>It works!</html>\n", id="html"),
        pytest.param(policy_text(*BASE[:3]).encode(), id="missing-max-age"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
def test_fetch_policy_with_invalid_body_is_policy_syntax_error(body: bytes) -> None:
    fetcher = TableFetcher({"mta-sts.example.com": body})
    with pytest.raises(PolicySyntaxError) as info:
        fetch_policy("example.com", fetcher)
    assert str(info.value).startswith("example.com: invalid policy (")
    assert tls_report_failure_reason(info.value) == "sts-policy-invalid"


def test_fetch_policy_not_utf8_chains_the_decode_error() -> None:
    fetcher = TableFetcher({"mta-sts.example.com": b"version: STSv1\xff\n"})
    with pytest.raises(PolicySyntaxError) as info:
        fetch_policy("example.com", fetcher)
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_get_returns_record_and_policy() -> None:
    resolver = TableResolver({"_mta-sts.example.com": ["v=spf1 -all", RECORD_TEXT]})
    fetcher = TableFetcher({"mta-sts.example.com": POLICY_BODY})
    result = get("Example.com.", resolver, fetcher)
    assert result == Result(
        record=Record("STSv1", "20240101T000000"),
        policy=enforce(MAIL),
        policy_text=POLICY_BODY.decode("utf-8"),
        error=None,
        record_text=RECORD_TEXT,
    )
    assert resolver.queries == ["_mta-sts.example.com"]
    assert fetcher.requests == [("mta-sts.example.com", POLICY_PATH)]


@pytest.mark.parametrize(
    ("answer", "error_class"),
    [
        pytest.param(
            DNSNotFound("_mta-sts.example.com TXT: NXDOMAIN"), NoRecordError, id="nxdomain"
        ),
        pytest.param(
            DNSTemporaryError("_mta-sts.example.com TXT: SERVFAIL"), DNSError, id="servfail"
        ),
        pytest.param(["v=STSv1; id=1", "v=STSv1; id=2"], MultipleRecordsError, id="two-records"),
        pytest.param(["v=STSv1; id=a-b"], RecordSyntaxError, id="invalid-record"),
        pytest.param(["v=spf1 -all"], NoRecordError, id="no-sts-record"),
    ],
)
def test_get_without_usable_record_does_not_fetch(
    answer: list[str] | Exception, error_class: type[MTASTSError]
) -> None:
    resolver = TableResolver({"_mta-sts.example.com": answer})
    fetcher = TableFetcher({"mta-sts.example.com": POLICY_BODY})
    result = get("example.com", resolver, fetcher)
    assert type(result.error) is error_class
    assert result.error.domain == "example.com"
    assert (result.record, result.policy, result.policy_text) == (None, None, None)
    assert fetcher.requests == []


@pytest.mark.parametrize(
    ("answer", "error_class", "cause_class"),
    [
        pytest.param(http_status(URL, 404), NoPolicyError, HTTPStatusError, id="404"),
        pytest.param(http_status(URL, 503), PolicyFetchError, HTTPStatusError, id="503"),
        pytest.param(
            CertificateError(f"{URL}: certificate for another name"),
            PolicyFetchError,
            CertificateError,
            id="certificate",
        ),
        pytest.param(
            FetchError(f"{URL}: timed out after 10.0s"), PolicyFetchError, FetchError, id="timeout"
        ),
        pytest.param(b"version: STSv1\n", PolicySyntaxError, type(None), id="invalid-policy"),
        pytest.param(b"\xff", PolicySyntaxError, UnicodeDecodeError, id="not-utf8"),
    ],
)
def test_get_keeps_the_record_when_the_policy_fails(
    answer: bytes | Exception, error_class: type[MTASTSError], cause_class: type
) -> None:
    resolver = TableResolver({"_mta-sts.example.com": [RECORD_TEXT]})
    fetcher = TableFetcher({"mta-sts.example.com": answer})
    result = get("example.com", resolver, fetcher)
    assert result.record == Record("STSv1", "20240101T000000")
    assert result.record_text == RECORD_TEXT
    assert (result.policy, result.policy_text) == (None, None)
    assert type(result.error) is error_class
    assert type(result.error.__cause__) is cause_class
    if isinstance(answer, Exception):
        assert result.error.__cause__ is answer


def test_get_rejects_an_invalid_domain() -> None:
    resolver = TableResolver({})
    fetcher = TableFetcher({})
    with pytest.raises(ValueError):
        get("not a domain", resolver, fetcher)
    assert resolver.queries == []
    assert fetcher.requests == []


# --------------------------------------------------------------------------------------------------
# Property-based tests.

MX_VALUE = re.compile(r"(\*\.)?[a-z0-9.-]+")


def check_policy_invariants(policy: Policy) -> None:
    """What every parsed policy guarantees, whatever text it came from."""
    assert policy.version == "STSv1"
    assert policy.mode in set(Mode)
    assert 0 <= policy.max_age <= MAX_MAX_AGE
    assert policy.mx or policy.mode is Mode.NONE
    for mx in policy.mx:
        assert is_hostname(mx.domain)
        assert MX_VALUE.fullmatch(str(mx))
        assert "*" not in mx.domain
    for name, value in policy.extensions:
        assert name not in ("version", "mode", "max_age", "mx")
        assert value == value.strip(" ")
        assert not re.search(r"[\x00-\x1f\x7f]", value)


def parse_policy_or_error(text: str | bytes) -> Policy | None:
    try:
        policy = parse_policy(text, "example.com")
    except PolicySyntaxError as exc:
        assert exc.domain == "example.com"
        return None
    check_policy_invariants(policy)
    return policy


# Fragments of policies, so random combinations reach every branch of the parser.
POLICY_LINES = st.one_of(
    st.sampled_from(
        [
            *BASE,
            "mode: testing",
            "mode: none",
            "mx: *.example.net",
            "mx: *.",
            "mx: 192.0.2.1",
            "mx: xn--bcher-kva.example",
            "mx: xn--zz.example",
            "max_age: 99999999999",
            "max_age: 31557601",
            "note: Grüße",
            "Mode: enforce",
            "",
            " ",
        ]
    ),
    st.builds(
        "{}{}{}{}".format,
        st.sampled_from(["version", "mode", "mx", "max_age", "note", "", "_x", "Mode"]),
        st.sampled_from([":", ": ", " :", ":\t", ""]),
        st.text(alphabet="aZ09.*-_:;= \t\r\u00fc\x00", max_size=12),
        st.sampled_from(["", " ", "\t", "\r"]),
    ),
)
POLICY_TERMS = st.sampled_from(["\n", "\r\n", "\r", "", "\n\n"])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_policy_syntax_error(body: bytes) -> None:
    parse_policy_or_error(body)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_raises_only_policy_syntax_error(text: str) -> None:
    parse_policy_or_error(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(POLICY_LINES, POLICY_TERMS), max_size=8))
def test_random_policy_fragments_raise_only_policy_syntax_error(
    parts: list[tuple[str, str]],
) -> None:
    text = "".join(line + term for line, term in parts)
    parse_policy_or_error(text)
    parse_policy_or_error(text.encode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n"), max_size=80),
        st.from_regex(r"[ \t]?(\*\.)?[a-zA-Z0-9.*_:-]{1,40}[ \t]?", fullmatch=True),
    )
)
def test_any_parsed_mx_is_a_lowercase_host_name(value: str) -> None:
    policy = parse_policy_or_error(enforce_mx(value))
    if policy is not None:
        (mx,) = policy.mx
        assert str(mx) == value.strip(" \t").lower()


RECORD_PIECES = st.one_of(
    st.sampled_from(["v=STSv1", "id=1", "id=" + "a" * 33, "ext=x", "=", ";", " ; ", "\t"]),
    st.text(alphabet="vSTs1id=;x_-. \t\xe9", max_size=10),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(RECORD_PIECES, max_size=10).map("".join)))
def test_random_text_raises_only_record_syntax_error(text: str) -> None:
    try:
        record = parse_record(text, "example.com")
    except RecordSyntaxError as exc:
        assert exc.domain == "example.com"
        return
    assert is_sts_record(text)
    assert record.version == "STSv1"
    assert re.fullmatch(r"[A-Za-z0-9]{1,32}", record.id)


# Strategies for valid values, following the ABNF.

LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
ALNUM = LOWER_ALNUM + LOWER_ALNUM[:26].upper()
# An LDH label (not an A-label, which must decode): alnum, then hyphens inside only.
LABELS = st.one_of(
    st.text(alphabet=LOWER_ALNUM, min_size=1, max_size=3),
    st.builds(
        lambda first, middle, last: first + middle + last,
        st.sampled_from(LOWER_ALNUM),
        st.text(alphabet=LOWER_ALNUM + "-", max_size=20),
        st.sampled_from(LOWER_ALNUM),
    ),
).filter(lambda label: not label.startswith("xn--"))
HOSTNAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join).filter(is_hostname)
# sts-ext-name and sts-policy-ext-name.
FIELD_NAMES = st.builds(
    str.__add__,
    st.sampled_from(ALNUM),
    st.text(alphabet=ALNUM + "_-.", max_size=31),
)
# sts-policy-vchar: visible ASCII or any UTF-8 encodable non-ASCII character.
POLICY_VCHARS = st.characters(min_codepoint=0x21, exclude_characters="\x7f", codec="utf-8")
# sts-policy-ext-value = sts-policy-vchar [*(%x20 / sts-policy-vchar) sts-policy-vchar]
POLICY_EXT_VALUES = st.builds(
    str.__add__,
    POLICY_VCHARS,
    st.one_of(
        st.just(""),
        st.builds(
            str.__add__,
            st.text(alphabet=st.one_of(st.just(" "), POLICY_VCHARS), max_size=20),
            POLICY_VCHARS,
        ),
    ),
)
WSP = st.text(alphabet=" \t", max_size=3)


def random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


@st.composite
def valid_policies(draw: st.DrawFn) -> tuple[str, Policy]:
    """A valid policy text, in any field order and layout, and the Policy it must parse to."""
    mode = draw(st.sampled_from(list(Mode)))
    max_age = draw(st.integers(min_value=0, max_value=9_999_999_999))
    mx = draw(
        st.lists(
            st.builds(MX, st.booleans(), HOSTNAMES),
            min_size=0 if mode is Mode.NONE else 1,
            max_size=4,
        )
    )
    extensions = draw(
        st.lists(
            st.tuples(
                FIELD_NAMES.filter(lambda name: name not in ("version", "mode", "max_age", "mx")),
                POLICY_EXT_VALUES,
            ),
            max_size=4,
        )
    )
    # Any field order; mx lines and extensions keep their order among themselves.
    queues = {
        "mx": [("mx", random_case(draw, str(pattern))) for pattern in mx],
        "ext": list(extensions),
    }
    singles = {"version": "STSv1", "mode": mode.value, "max_age": str(max_age)}
    tags = draw(st.permutations([*singles, *["mx"] * len(mx), *["ext"] * len(extensions)]))
    fields = [(tag, singles[tag]) if tag in singles else queues[tag].pop(0) for tag in tags]
    # A repeated non-mx field after its first occurrence is ignored (RFC 8461 §3.2), whatever
    # its value.
    fields += draw(
        st.lists(
            st.tuples(st.sampled_from(["version", "mode", "max_age"]), POLICY_EXT_VALUES),
            max_size=2,
        )
    )
    texts = [f"{key}:{draw(WSP)}{value}{draw(WSP)}" for key, value in fields]
    terms = [draw(st.sampled_from(["\n", "\r\n"])) for _ in texts]
    final = draw(st.booleans())
    text = "".join(line + term for line, term in zip(texts, terms, strict=True))
    if not final:
        text = text[: -len(terms[-1])]
    expected = Policy(
        version="STSv1",
        mode=mode,
        mx=tuple(mx),
        max_age=min(max_age, MAX_MAX_AGE),
        extensions=tuple(extensions),
    )
    return text, expected


@settings(max_examples=200, deadline=None)
@given(valid_policies())
def test_generated_valid_policies_parse_to_their_values(case: tuple[str, Policy]) -> None:
    text, expected = case
    assert parse_policy(text) == expected
    assert parse_policy(text.encode("utf-8")) == expected


@st.composite
def valid_records(draw: st.DrawFn) -> tuple[str, Record]:
    record_id = draw(st.text(alphabet=ALNUM, min_size=1, max_size=32))
    extensions = draw(
        st.lists(
            st.tuples(
                FIELD_NAMES.filter(lambda name: name != "id"),
                st.text(alphabet=EXT_VALUE_ALL, min_size=1, max_size=10),
            ),
            max_size=3,
        )
    )
    fields = [f"{name}={value}" for name, value in extensions]
    fields.insert(draw(st.integers(0, len(fields))), f"id={record_id}")
    text = "v=STSv1"
    for field in fields:
        text += f"{draw(WSP)};{draw(WSP)}{field}"
    if draw(st.booleans()):
        text += f"{draw(WSP)};{draw(WSP)}"
    return text, Record("STSv1", record_id, tuple(extensions))


@settings(max_examples=300, deadline=None)
@given(valid_records())
def test_generated_valid_records_parse_to_their_values(case: tuple[str, Record]) -> None:
    text, expected = case
    assert is_sts_record(text)
    assert parse_record(text) == expected


def reference_match(mx: MX, hostname: str) -> bool:
    """RFC 8461 §4.1 in the plainest terms, for ASCII host names."""
    name = hostname.lower()
    if name.endswith("."):
        name = name[:-1]
    if not mx.wildcard:
        return name == mx.domain
    labels = name.split(".")
    return len(labels) >= 2 and ".".join(labels[1:]) == mx.domain


@st.composite
def mx_and_hostnames(draw: st.DrawFn) -> tuple[MX, str]:
    mx = MX(draw(st.booleans()), draw(HOSTNAMES))
    hostname = draw(
        st.one_of(
            st.just(mx.domain),
            st.builds(lambda label: f"{label}.{mx.domain}", LABELS),
            st.builds(lambda a, b: f"{a}.{b}.{mx.domain}", LABELS, LABELS),
            st.builds(lambda label: f"{mx.domain}.{label}", LABELS),
            HOSTNAMES,
        ).filter(lambda name: len(name) <= 253)
    )
    hostname = random_case(draw, hostname) + draw(st.sampled_from(["", "."]))
    return mx, hostname


@settings(max_examples=300, deadline=None)
@given(mx_and_hostnames())
def test_policy_matches_agrees_with_reference(case: tuple[MX, str]) -> None:
    mx, hostname = case
    policy = Policy("STSv1", Mode.ENFORCE, (mx,), 1)
    assert policy.matches(hostname) is reference_match(mx, hostname)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_to_alabel_raises_only_value_error(domain: str) -> None:
    try:
        name = to_alabel(domain)
    except ValueError:
        assert not MATCH_POLICY.matches(domain)
        return
    assert is_hostname(name)
    assert to_alabel(name) == name
