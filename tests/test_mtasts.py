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


def only(key: str, value: str) -> str:
    """A valid ``none`` policy plus one ``key: value`` line, to test a value on its own."""
    return policy_text("version: STSv1", "mode: none", "max_age: 1", f"{key}: {value}")


def enforce_mx(*patterns: str) -> str:
    return policy_text(
        "version: STSv1", "mode: enforce", "max_age: 1", *(f"mx: {p}" for p in patterns)
    )


def host(label: str, count: int) -> str:
    """A host name of ``count`` copies of ``label`` under ``.example``."""
    return ".".join([label] * count) + ".example"


LABEL_63 = "a" * 63
NAME_253 = ".".join(["a" * 63] * 3 + ["b" * 61])  # 63*3 + 61 + 3 dots = 253
NAME_254 = NAME_253 + "b"
assert len(NAME_253) == 253 and len(NAME_254) == 254


# --------------------------------------------------------------------------------------------------
# RFC 8461 §3.1: the TXT record.

EXT_VALUE_ALL = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "=;")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=STSv1; id=20160831085700Z", Record("STSv1", "20160831085700Z")),
        ("v=STSv1;id=1", Record("STSv1", "1")),
        ("v=STSv1 ;id=1", Record("STSv1", "1")),
        ("v=STSv1\t;\tid=1", Record("STSv1", "1")),
        ("v=STSv1  \t;  \t id=1", Record("STSv1", "1")),
        ("v=STSv1; id=1;", Record("STSv1", "1")),
        ("v=STSv1; id=1; ", Record("STSv1", "1")),
        ("v=STSv1; id=1 \t; \t", Record("STSv1", "1")),
        ("v=STSv1; id=" + "a" * 32, Record("STSv1", "a" * 32)),
        ("v=STSv1; id=AbC019xyZ", Record("STSv1", "AbC019xyZ")),
        ("v=STSv1; id=1; ext=value", Record("STSv1", "1", (("ext", "value"),))),
        ("v=STSv1; ext=value; id=1", Record("STSv1", "1", (("ext", "value"),))),
        ("v=STSv1; b=2; id=1; a=1", Record("STSv1", "1", (("b", "2"), ("a", "1")))),
        ("v=STSv1; id=1; 9x=1", Record("STSv1", "1", (("9x", "1"),))),
        ("v=STSv1; id=1; a_b-c.d=1", Record("STSv1", "1", (("a_b-c.d", "1"),))),
        ("v=STSv1; id=1; " + "n" * 32 + "=1", Record("STSv1", "1", (("n" * 32, "1"),))),
        ("v=STSv1; id=1; ext=" + EXT_VALUE_ALL, Record("STSv1", "1", (("ext", EXT_VALUE_ALL),))),
        # sts-ext-name allows "v" and other-case spellings of "id": they are extensions.
        ("v=STSv1; v=STSv2; id=1", Record("STSv1", "1", (("v", "STSv2"),))),
        ("v=STSv1; ID=2; id=1", Record("STSv1", "1", (("ID", "2"),))),
        # RFC 8461 §3.2 (which covers both records): a repeated field other than "mx": first wins.
        ("v=STSv1; id=first; id=second", Record("STSv1", "first")),
    ],
    ids=[
        "rfc-example",
        "no-wsp",
        "space-before-delimiter",
        "tabs-around-delimiter",
        "mixed-wsp-around-delimiter",
        "trailing-delimiter",
        "trailing-delimiter-and-space",
        "trailing-delimiter-with-wsp-both-sides",
        "id-32-chars",
        "id-mixed-case-and-digits",
        "extension-after-id",
        "extension-before-id",
        "extensions-kept-in-order",
        "extension-name-starts-with-digit",
        "extension-name-with-underscore-hyphen-dot",
        "extension-name-32-chars",
        "extension-value-every-allowed-char",
        "extension-named-v",
        "extension-named-uppercase-ID",
        "repeated-id-first-wins",
    ],
)
def test_parse_record_accepts_valid_records(text: str, expected: Record) -> None:
    assert parse_record(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v=STSv1",
        "v=STSv1;",
        "v=STSv1; ",
        "v=STSv1 ",
        "V=STSv1; id=1",
        "v=stsv1; id=1",
        "v=STSV1; id=1",
        "v=STSv2; id=1",
        "v=STSv10; id=1",
        " v=STSv1; id=1",
        "\tv=STSv1; id=1",
        "v = STSv1; id=1",
        "v=STSv1 id=1",
        "v=STSv1, id=1",
        "v=STSv1;; id=1",
        "v=STSv1; ; id=1",
        "v=STSv1; id=1;;",
        "v=STSv1; id=1; ;",
        "v=STSv1; id=1 ",
        "v=STSv1; id=1\t",
        "v=STSv1; id=",
        "v=STSv1; id=" + "a" * 33,
        "v=STSv1; id=abc-def",
        "v=STSv1; id=abc_def",
        "v=STSv1; id=abc.def",
        "v=STSv1; id=a b",
        "v=STSv1; id=caf\xe9",
        "v=STSv1; id=1\x00",
        "v=STSv1; id = 1",
        "v=STSv1; ext=1",
        "v=STSv1; ID=1",
        "v=STSv1; id",
        "v=STSv1; id=1; ext",
        "v=STSv1; id=1; =value",
        "v=STSv1; id=1; _ext=1",
        "v=STSv1; id=1; -ext=1",
        "v=STSv1; id=1; .ext=1",
        "v=STSv1; id=1; " + "n" * 33 + "=1",
        "v=STSv1; id=1; e+xt=1",
        "v=STSv1; id=1; \xe9xt=1",
        "v=STSv1; id=1; ext=",
        "v=STSv1; id=1; ext=a=b",
        "v=STSv1; id=1; ext=a b",
        "v=STSv1; id=1; ext=a\tb",
        "v=STSv1; id=1; ext=caf\xe9",
        "v=STSv1; id=1; ext=a\x7f",
        "v=STSv1; id=1; ext=a\x00",
        "v=STSv1; id=1; ext=a\nb",
        # A later invalid "id" is still an invalid "id" field, not an extension named "id".
        "v=STSv1; id=1; id=bad-id",
    ],
    ids=[
        "empty",
        "version-only",
        "version-and-delimiter-only",
        "version-delimiter-space-only",
        "version-and-space",
        "version-key-uppercase",
        "version-value-lowercase",
        "version-value-uppercase-V",
        "version-2",
        "version-prefix-of-longer",
        "leading-space",
        "leading-tab",
        "spaces-around-version-equals",
        "missing-delimiter-after-version",
        "comma-delimiter",
        "empty-field-after-version",
        "empty-field-with-space",
        "empty-field-at-end",
        "empty-field-at-end-with-space",
        "trailing-space-without-delimiter",
        "trailing-tab-without-delimiter",
        "id-empty",
        "id-33-chars",
        "id-with-hyphen",
        "id-with-underscore",
        "id-with-dot",
        "id-with-space",
        "id-non-ascii",
        "id-with-nul",
        "id-spaces-around-equals",
        "missing-id",
        "missing-id-only-uppercase-ID",
        "id-without-equals",
        "extension-without-equals",
        "extension-empty-name",
        "extension-name-starts-with-underscore",
        "extension-name-starts-with-hyphen",
        "extension-name-starts-with-dot",
        "extension-name-33-chars",
        "extension-name-with-plus",
        "extension-name-non-ascii",
        "extension-value-empty",
        "extension-value-with-equals",
        "extension-value-with-space",
        "extension-value-with-tab",
        "extension-value-non-ascii",
        "extension-value-with-del",
        "extension-value-with-nul",
        "extension-value-with-newline",
        "repeated-id-invalid",
    ],
)
def test_parse_record_rejects_invalid_records(text: str) -> None:
    with pytest.raises(RecordSyntaxError):
        parse_record(text)


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
        ("v=STSv1;", True),
        ("v=STSv1; id=1", True),
        ("v=STSv1 ; id=1", True),
        ("v=STSv1\t;id=1", True),
        ("v=STSv1;;;", True),
        ("", False),
        ("v=STSv1", False),
        ("v=STSv1 id=1", False),
        (" v=STSv1; id=1", False),
        ("V=STSv1; id=1", False),
        ("v=stsv1; id=1", False),
        ("v=STSv10; id=1", False),
        ("id=1; v=STSv1;", False),
        ("v=spf1 -all", False),
        ("v=DMARC1; p=none", False),
        ("v=TLSRPTv1; rua=mailto:tlsrpt@example.com", False),
    ],
    ids=[
        "version-and-delimiter",
        "full-record",
        "space-before-delimiter",
        "tab-before-delimiter",
        "invalid-but-sts",
        "empty",
        "version-without-delimiter",
        "version-and-space-without-delimiter",
        "leading-space",
        "version-key-uppercase",
        "version-value-lowercase",
        "version-prefix-of-longer",
        "version-not-first",
        "spf",
        "dmarc",
        "tlsrpt",
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
    "version: STSv1", "mode: enforce", "mx: mail.example.com", "mx: *.example.net",
    "mx: backupmx.example.com", "max_age: 604800",
)  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            RFC_EXAMPLE,
            enforce(
                MAIL,
                MX(True, "example.net"),
                MX(False, "backupmx.example.com"),
                max_age=604800,
            ),
        ),
        (policy_text(*BASE), enforce(MAIL)),
        (policy_text(*BASE, final=False), enforce(MAIL)),
        (policy_text(*BASE, term="\r\n"), enforce(MAIL)),
        (policy_text(*BASE, term="\r\n", final=False), enforce(MAIL)),
        (
            "version: STSv1\r\nmode: enforce\nmx: mail.example.com\r\nmax_age: 86400\n",
            enforce(MAIL),
        ),
        (policy_text(*(line.replace(": ", ":") for line in BASE)), enforce(MAIL)),
        (policy_text(*(line.replace(": ", ":\t") for line in BASE)), enforce(MAIL)),
        (policy_text(*(line.replace(": ", ": \t  ") for line in BASE)), enforce(MAIL)),
        (policy_text(*(line + " \t " for line in BASE)), enforce(MAIL)),
        (policy_text(*(line + " " for line in BASE), term="\r\n"), enforce(MAIL)),
        (policy_text(*(line + "\t" for line in BASE), final=False), enforce(MAIL)),
        (policy_text(*reversed(BASE)), enforce(MAIL)),
        (
            policy_text("version: STSv1", "mode: testing", "mx: mail.example.com", "max_age: 1"),
            Policy("STSv1", Mode.TESTING, (MAIL,), 1),
        ),
        (
            policy_text("version: STSv1", "mode: none", "max_age: 1"),
            Policy("STSv1", Mode.NONE, (), 1),
        ),
        (
            policy_text("version: STSv1", "mode: none", "mx: mail.example.com", "max_age: 1"),
            Policy("STSv1", Mode.NONE, (MAIL,), 1),
        ),
        (
            policy_text(*BASE, "mx: *.example.net", "mx: mail.example.com"),
            enforce(MAIL, MX(True, "example.net"), MAIL),
        ),
        (policy_text(*BASE, "mode: testing"), enforce(MAIL)),
        (policy_text(*BASE, "version: STSv2"), enforce(MAIL)),
        (policy_text(*BASE, "max_age: 1"), enforce(MAIL)),
        (policy_text(*BASE, "mode: bogus", "max_age: x"), enforce(MAIL)),
        (
            base_with("zeta: 1", "alpha: two words", "x.y-z_9: v", "zeta: 2"),
            enforce(
                MAIL,
                extensions=(("zeta", "1"), ("alpha", "two words"), ("x.y-z_9", "v"), ("zeta", "2")),
            ),
        ),
        (base_with("note: a  b   c"), enforce(MAIL, extensions=(("note", "a  b   c"),))),
        (base_with("note: a:b=c;d#e"), enforce(MAIL, extensions=(("note", "a:b=c;d#e"),))),
        (
            base_with("note: Grüße aus Köln"),
            enforce(MAIL, extensions=(("note", "Grüße aus Köln"),)),
        ),
        (base_with("note: 日本語 ✉ 😀"), enforce(MAIL, extensions=(("note", "日本語 ✉ 😀"),))),
        (base_with("note:  x  \t"), enforce(MAIL, extensions=(("note", "x"),))),
        (base_with("9note: x"), enforce(MAIL, extensions=(("9note", "x"),))),
        (base_with("n" * 32 + ": x"), enforce(MAIL, extensions=(("n" * 32, "x"),))),
        (
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
        ),
    ],
    ids=[
        "rfc-example",
        "lf",
        "lf-without-final-terminator",
        "crlf",
        "crlf-without-final-terminator",
        "mixed-lf-and-crlf",
        "no-space-after-colon",
        "tab-after-colon",
        "spaces-and-tabs-after-colon",
        "trailing-wsp",
        "trailing-space-before-crlf",
        "trailing-tab-at-end-of-text",
        "any-field-order",
        "mode-testing",
        "mode-none-without-mx",
        "mode-none-with-mx",
        "mx-repeats-in-policy-order",
        "repeated-mode-first-wins",
        "repeated-version-first-wins",
        "repeated-max-age-first-wins",
        "repeated-invalid-values-ignored",
        "unknown-fields-kept-in-order",
        "extension-inner-spaces",
        "extension-punctuation",
        "extension-utf8-latin",
        "extension-utf8-cjk-symbols-emoji",
        "extension-value-wsp-trimmed",
        "extension-name-starts-with-digit",
        "extension-name-32-chars",
        "keys-are-case-sensitive",
    ],
)
def test_parse_policy_accepts_valid_policies(text: str, expected: Policy) -> None:
    assert parse_policy(text) == expected
    assert parse_policy(text.encode("utf-8")) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("1", 1),
        ("86400", 86400),
        ("0086400", 86400),
        ("31557599", 31557599),
        ("31557600", 31557600),
        ("31557601", MAX_MAX_AGE),
        ("9999999999", MAX_MAX_AGE),
        ("0000000000", 0),
    ],
    ids=[
        "zero",
        "one",
        "one-day",
        "leading-zeros",
        "just-below-one-year",
        "one-year",
        "one-year-plus-one-capped",
        "ten-digits-capped",
        "ten-zeros",
    ],
)
def test_max_age_is_parsed_and_capped_at_one_year(value: str, expected: int) -> None:
    text = policy_text("version: STSv1", "mode: none", f"max_age: {value}")
    assert parse_policy(text).max_age == expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("mail.example.com", MX(False, "mail.example.com")),
        ("*.example.com", MX(True, "example.com")),
        ("MAIL.Example.COM", MX(False, "mail.example.com")),
        ("*.EXAMPLE.com", MX(True, "example.com")),
        ("mx-1.example.com", MX(False, "mx-1.example.com")),
        ("123.example.com", MX(False, "123.example.com")),
        ("1.2.3.example", MX(False, "1.2.3.example")),
        ("localhost", MX(False, "localhost")),
        ("*.com", MX(True, "com")),
        ("xn--bcher-kva.example", MX(False, "xn--bcher-kva.example")),
        ("XN--BCHER-KVA.Example", MX(False, "xn--bcher-kva.example")),
        ("*.xn--mnchen-3ya.example", MX(True, "xn--mnchen-3ya.example")),
        ("mx.xn--e1afmkfd.xn--80akhbyknj4f", MX(False, "mx.xn--e1afmkfd.xn--80akhbyknj4f")),
        ("r3---sn-ab5l6nzr.example.com", MX(False, "r3---sn-ab5l6nzr.example.com")),
        (LABEL_63 + ".example", MX(False, LABEL_63 + ".example")),
        (NAME_253, MX(False, NAME_253)),
        ("*." + NAME_253, MX(True, NAME_253)),
    ],
    ids=[
        "hostname",
        "wildcard",
        "uppercase-lowercased",
        "uppercase-wildcard-lowercased",
        "inner-hyphen",
        "numeric-first-label",
        "numeric-labels-but-last",
        "single-label",
        "wildcard-over-tld",
        "a-label",
        "a-label-uppercase-lowercased",
        "wildcard-over-a-label",
        "a-labels-cyrillic",
        "hyphens-in-3rd-and-4th-position-not-xn",
        "label-63-chars",
        "name-253-chars",
        "wildcard-over-253-chars",
    ],
)
def test_mx_values_that_are_host_names_are_accepted(pattern: str, expected: MX) -> None:
    assert parse_policy(enforce_mx(pattern)).mx == (expected,)


@pytest.mark.parametrize(
    "pattern",
    [
        "bücher.example",
        "mail.bücher.example",
        "*.bücher.example",
        "192.0.2.1",
        "[192.0.2.1]",
        "*.192.0.2.1",
        "mail.example.123",
        "2001:db8::1",
        "[IPv6:2001:db8::1]",
        "*",
        "*.",
        "*example.com",
        "**.example.com",
        "*.*.example.com",
        "a.*.example.com",
        "mail.*",
        "mail*.example.com",
        ".example.com",
        "mail.example.com.",
        "*.example.com.",
        "mail..example.com",
        "-mail.example.com",
        "mail-.example.com",
        "mail.-example.com",
        "mail_1.example.com",
        "a" * 64 + ".example",
        NAME_254,
        "mail.example.com:25",
        "a.com:b.com",
        "a.com servername=x",
        "a.com,b.com",
        "a.com;b.com",
        "a.com/b",
        "{x}",
        "a.com{x}",
        "${x}",
        "mail.example.com\\",
        "'mail.example.com'",
        "xn--zz.example",
        "xn--.example",
        "xn--bcher-kva-.example",
        "xn--ls8h.example",
        "mail.ex\u0430mple.com",
    ],
    ids=[
        "u-label",
        "u-label-inner",
        "u-label-wildcard",
        "ipv4",
        "ipv4-literal",
        "wildcard-over-ipv4",
        "numeric-tld",
        "ipv6",
        "ipv6-literal",
        "star-alone",
        "star-dot-alone",
        "star-without-dot",
        "double-star",
        "two-wildcard-labels",
        "inner-wildcard",
        "trailing-wildcard",
        "partial-label-wildcard",
        "leading-dot",
        "trailing-dot",
        "wildcard-trailing-dot",
        "empty-label",
        "label-leading-hyphen",
        "label-trailing-hyphen",
        "inner-label-leading-hyphen",
        "underscore",
        "label-64-chars",
        "name-254-chars",
        "port",
        "injection-colon",
        "injection-space-attribute",
        "injection-comma",
        "injection-semicolon",
        "slash",
        "injection-braces",
        "injection-braces-suffix",
        "injection-dollar-braces",
        "backslash",
        "quotes",
        "a-label-not-punycode",
        "a-label-prefix-only",
        "a-label-trailing-hyphen",
        "a-label-idna2008-disallowed",
        "cyrillic-a-lookalike",
    ],
)
def test_mx_values_that_are_not_host_names_are_rejected(pattern: str) -> None:
    with pytest.raises(PolicySyntaxError):
        parse_policy(enforce_mx(pattern))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "\r\n",
        " ",
        "\n" + policy_text(*BASE),
        policy_text(*BASE[:2], "", *BASE[2:]),
        policy_text(*BASE) + "\n",
        policy_text(*BASE, term="\r\n") + "\r\n",
        policy_text(*BASE[:2], " ", *BASE[2:]),
        policy_text(*BASE[:2], "\t", *BASE[2:]),
        policy_text(*BASE, term="\r"),
        policy_text(*BASE, final=False) + "\r",
        policy_text(*BASE, term="\r\r\n"),
        policy_text(*BASE, term="\n\r"),
        base_with("note: a\rb"),
        policy_text(*BASE[:3], "max_age: 86400\r"),
        policy_text("mode : enforce", *BASE[:1], *BASE[2:]),
        policy_text("mode\t: enforce", *BASE[:1], *BASE[2:]),
        policy_text(" mode: enforce", *BASE[:1], *BASE[2:]),
        policy_text("\tmode: enforce", *BASE[:1], *BASE[2:]),
        policy_text("mode enforce", *BASE[:1], *BASE[2:]),
        policy_text("mode=enforce", *BASE[:1], *BASE[2:]),
        "\ufeff" + policy_text(*BASE),
        base_with(": value"),
        base_with("_note: x"),
        base_with("-note: x"),
        base_with(".note: x"),
        base_with("n" * 33 + ": x"),
        base_with("nöte: x"),
        base_with("no te: x"),
        base_with("note:"),
        base_with("note:   \t"),
        base_with("note: a\tb"),
        base_with("note: a \t b"),
        base_with("note: a\x00b"),
        base_with("note: a\x7fb"),
        base_with("note: \x1b[31mred"),
        base_with("note: a\x0bb"),
        base_with("note: a\x0cb"),
        base_with("note: \ud800"),
        policy_text("mode: enforce", "mx: mail.example.com", "max_age: 1"),
        policy_text("version: STSv1", "mx: mail.example.com", "max_age: 1"),
        policy_text("version: STSv1", "mode: enforce", "mx: mail.example.com"),
        policy_text("version: STSv1", "mode: enforce", "max_age: 1"),
        policy_text("version: STSv1", "mode: testing", "max_age: 1"),
        policy_text("version: STSv1", "Mode: enforce", "mx: mail.example.com", "max_age: 1"),
        policy_text("Version: STSv1", "mode: enforce", "mx: mail.example.com", "max_age: 1"),
        policy_text("version: STSv1", "mode: enforce", "mx: mail.example.com", "Max_age: 1"),
        policy_text("version: STSv1", "mode: enforce", "MX: mail.example.com", "max_age: 1"),
        policy_text("version: stsv1", *BASE[1:]),
        policy_text("version: STSV1", *BASE[1:]),
        policy_text("version: STSv2", *BASE[1:]),
        policy_text("version: STSv1 x", *BASE[1:]),
        policy_text("version:", *BASE[1:]),
        policy_text(BASE[0], "mode: Enforce", *BASE[2:]),
        policy_text(BASE[0], "mode: ENFORCE", *BASE[2:]),
        policy_text(BASE[0], "mode: TESTING", *BASE[2:]),
        policy_text(BASE[0], "mode: None", "max_age: 1"),
        policy_text(BASE[0], "mode: off", *BASE[2:]),
        policy_text(BASE[0], "mode: enforce testing", *BASE[2:]),
        policy_text(BASE[0], "mode: enforced", *BASE[2:]),
    ],
    ids=[
        "empty",
        "only-lf",
        "only-crlf",
        "only-space",
        "leading-blank-line",
        "blank-line-inside",
        "two-final-lf",
        "two-final-crlf",
        "line-of-spaces",
        "line-of-tab",
        "cr-line-ends",
        "stray-cr-at-end",
        "cr-cr-lf",
        "lf-cr",
        "stray-cr-inside-value",
        "stray-cr-after-last-value",
        "space-before-colon",
        "tab-before-colon",
        "leading-space",
        "leading-tab",
        "no-colon",
        "equals-instead-of-colon",
        "byte-order-mark",
        "empty-key",
        "key-starts-with-underscore",
        "key-starts-with-hyphen",
        "key-starts-with-dot",
        "key-33-chars",
        "key-non-ascii",
        "key-with-space",
        "extension-empty-value",
        "extension-only-wsp-value",
        "extension-value-with-tab",
        "extension-value-with-space-tab-space",
        "extension-value-with-nul",
        "extension-value-with-del",
        "extension-value-with-escape",
        "extension-value-with-vertical-tab",
        "extension-value-with-form-feed",
        "extension-value-lone-surrogate",
        "missing-version",
        "missing-mode",
        "missing-max-age",
        "missing-mx-enforce",
        "missing-mx-testing",
        "mode-key-capitalised-so-mode-missing",
        "version-key-capitalised-so-version-missing",
        "max-age-key-capitalised-so-max-age-missing",
        "mx-key-uppercase-so-mx-missing",
        "version-lowercase",
        "version-uppercase-v",
        "version-2",
        "version-with-trailing-word",
        "version-empty",
        "mode-capitalised",
        "mode-uppercase",
        "mode-testing-uppercase",
        "mode-none-capitalised",
        "mode-unknown",
        "mode-two-words",
        "mode-prefix",
    ],
)
def test_parse_policy_rejects_invalid_policies(text: str) -> None:
    with pytest.raises(PolicySyntaxError):
        parse_policy(text)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "-1",
        "+1",
        "1.5",
        "1e3",
        "0x10",
        "1 2",
        "1_000",
        "99999999999",
        "00000000000",
        "31557600000",
        "\u0663",
        "\uff11",
        "one",
    ],
    ids=[
        "empty",
        "negative",
        "plus-sign",
        "decimal",
        "exponent",
        "hex",
        "inner-space",
        "underscore",
        "eleven-digits",
        "eleven-zeros",
        "eleven-digits-year",
        "arabic-indic-digit",
        "fullwidth-digit",
        "word",
    ],
)
def test_max_age_that_is_not_1_to_10_digits_is_rejected(value: str) -> None:
    with pytest.raises(PolicySyntaxError):
        parse_policy(policy_text("version: STSv1", "mode: none", f"max_age: {value}"))


@pytest.mark.parametrize(
    "body",
    [
        b"\xff",
        b"version: STSv1\nmode: none\nmax_age: 1\nnote: Gr\xfc\xdfe\n",
        b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xc3(\n",
        b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xc0\xaf\n",
        b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xed\xa0\x80\n",
        b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xf4\x90\x80\x80\n",
        b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xe2\x82\n",
        "version: STSv1\nmode: none\nmax_age: 1\n".encode("utf-16"),
    ],
    ids=[
        "single-ff",
        "latin-1",
        "bad-continuation",
        "overlong",
        "surrogate",
        "above-u10ffff",
        "truncated",
        "utf-16",
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
        (policy_text("mode: enforce", "mx: a.example", "max_age: 1"), '"version"'),
        (policy_text("version: STSv1", "mx: a.example", "max_age: 1"), '"mode"'),
        (policy_text("version: STSv1", "mode: enforce", "mx: a.example"), '"max_age"'),
        (policy_text("version: STSv1", "mode: enforce", "max_age: 1"), '"mx"'),
        (policy_text("version: STSv1", "mode: Enforce", "max_age: 1"), "'Enforce'"),
        (policy_text("version: STSv1", "mode: none", "max_age: 1x"), "'1x'"),
    ],
    ids=["version", "mode", "max-age", "mx", "mode-value", "max-age-value"],
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
        ("mail.example.com", True),
        ("MAIL.Example.COM", True),
        ("mail.example.com.", True),
        ("MAIL.EXAMPLE.COM.", True),
        ("example.com", False),
        ("other.example.com", False),
        ("xmail.example.com", False),
        ("a.mail.example.com", False),
        ("mail.example.com.evil", False),
        ("a.example.net", True),
        ("A.Example.NET.", True),
        ("mx-1.example.net", True),
        ("example.net", False),
        ("a.b.example.net", False),
        ("aexample.net", False),
        (".example.net", False),
        ("*.example.net", False),
        ("mx.bücher.example", True),
        ("MX.Bücher.Example.", True),
        ("mx.xn--bcher-kva.example", True),
        ("MX.XN--BCHER-KVA.EXAMPLE.", True),
        ("mail.münchen.example", True),
        ("ü.münchen.example", True),
        ("münchen.example", False),
        ("a.b.münchen.example", False),
        ("", False),
        (".", False),
        ("mail..example.com", False),
        ("mail example.com", False),
        ("mail.example.com:25", False),
        ("-mail.example.com", False),
        ("192.0.2.1", False),
        ("[192.0.2.1]", False),
        ("bücher..example", False),
    ],
    ids=[
        "exact",
        "case-insensitive",
        "trailing-dot",
        "case-and-trailing-dot",
        "parent-of-exact",
        "sibling-of-exact",
        "prefix-of-exact",
        "child-of-exact",
        "suffix-added",
        "wildcard-one-label",
        "wildcard-case-and-trailing-dot",
        "wildcard-hyphenated-label",
        "wildcard-not-bare-domain",
        "wildcard-not-two-labels",
        "wildcard-not-unseparated",
        "wildcard-not-empty-label",
        "wildcard-literal-star",
        "idn-u-label",
        "idn-u-label-case-and-trailing-dot",
        "idn-a-label",
        "idn-a-label-uppercase",
        "idn-wildcard-u-label",
        "idn-wildcard-u-label-first-label",
        "idn-wildcard-not-bare-domain",
        "idn-wildcard-not-two-labels",
        "invalid-empty",
        "invalid-dot",
        "invalid-empty-label",
        "invalid-space",
        "invalid-port",
        "invalid-leading-hyphen",
        "invalid-ipv4",
        "invalid-ipv4-literal",
        "invalid-idn-empty-label",
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
        (MX(False, "mail.example.com"), "mail.example.com"),
        (MX(True, "example.com"), "*.example.com"),
        (MX(False, "xn--bcher-kva.example"), "xn--bcher-kva.example"),
    ],
    ids=["hostname", "wildcard", "a-label"],
)
def test_mx_str_is_the_policy_pattern(mx: MX, text: str) -> None:
    assert str(mx) == text
    assert str(parse_policy(enforce_mx(text.upper())).mx[0]) == text


# --------------------------------------------------------------------------------------------------
# Domains: U-labels or A-labels, any case, optional trailing dot; always the A-label form out.


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("EXAMPLE.COM.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("BÜCHER.EXAMPLE.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.Example.", "xn--bcher-kva.example"),
        ("münchen.xn--bcher-kva.example", "xn--mnchen-3ya.xn--bcher-kva.example"),
        ("пример.испытание", "xn--e1afmkfd.xn--80akhbyknj4f"),
        ("faß.example", "xn--fa-hia.example"),
        ("localhost", "localhost"),
        (NAME_253, NAME_253),
        (NAME_253 + ".", NAME_253),
    ],
    ids=[
        "a-label-lowercase",
        "mixed-case",
        "trailing-dot",
        "uppercase-trailing-dot",
        "u-label",
        "u-label-mixed-case",
        "u-label-uppercase-trailing-dot",
        "a-label-idn",
        "a-label-idn-uppercase-trailing-dot",
        "u-label-and-a-label-mixed",
        "cyrillic",
        "sharp-s-not-mapped-to-ss",
        "single-label",
        "253-chars",
        "253-chars-and-trailing-dot",
    ],
)
def test_to_alabel(domain: str, expected: str) -> None:
    assert to_alabel(domain) == expected


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "..",
        "example..com",
        ".example.com",
        "example.com..",
        "exa mple.com",
        "-example.com",
        "example-.com",
        "example_1.com",
        "example.com:25",
        "*.example.com",
        "192.0.2.1",
        "[192.0.2.1]",
        "a" * 64 + ".com",
        NAME_254,
        "xn--zz.example",
        "bücher..example",
        "i\u2764.example",
        "\ud800.example",
        "a\x00b.example",
    ],
    ids=[
        "empty",
        "dot",
        "two-dots",
        "empty-label",
        "leading-dot",
        "two-trailing-dots",
        "space",
        "leading-hyphen",
        "trailing-hyphen",
        "underscore",
        "port",
        "wildcard",
        "ipv4",
        "ipv4-literal",
        "label-64-chars",
        "254-chars",
        "invalid-a-label",
        "u-label-empty-label",
        "idna2008-disallowed-symbol",
        "lone-surrogate",
        "nul",
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
        (NoRecordError("example.com", "x"), ""),
        (MultipleRecordsError("example.com", "x"), ""),
        (DNSError("example.com", "x"), ""),
        (RecordSyntaxError("example.com", "x"), ""),
        (NoPolicyError("example.com", "x"), "sts-policy-fetch-error"),
        (PolicyFetchError("example.com", "x"), "sts-policy-fetch-error"),
        (PolicyFetchError("example.com", "x", webpki=True), "sts-webpki-invalid"),
        (PolicySyntaxError("example.com", "x"), "sts-policy-invalid"),
        (ValueError("x"), ""),
        (OSError("x"), ""),
    ],
    ids=[
        "NoRecordError",
        "MultipleRecordsError",
        "DNSError",
        "RecordSyntaxError",
        "NoPolicyError",
        "PolicyFetchError",
        "PolicyFetchError-webpki",
        "PolicySyntaxError",
        "ValueError",
        "OSError",
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

    def get(self, host: str, path: str = POLICY_PATH) -> bytes:
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
    ["Bücher.Example.", "xn--bcher-kva.example", "XN--BCHER-KVA.EXAMPLE."],
    ids=["u-label", "a-label", "a-label-uppercase-trailing-dot"],
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
        [],
        ["v=spf1 -all"],
        ["v=STSv1 id=1", "V=STSv1; id=1", "v=STSv10; id=1"],
    ],
    ids=["no-records", "only-other-records", "only-near-misses"],
)
def test_lookup_record_without_sts_record_is_no_record(records: list[str]) -> None:
    resolver = TableResolver({"_mta-sts.example.com": records})
    with pytest.raises(NoRecordError) as info:
        lookup_record("example.com", resolver)
    assert str(info.value).startswith("example.com: no MTA-STS record (_mta-sts.example.com")


@pytest.mark.parametrize(
    "records",
    [
        ["v=STSv1; id=1", "v=STSv1; id=2"],
        ["v=STSv1; id=1", "v=STSv1; id=1"],
        ["v=STSv1; id=1", "v=STSv1;"],
        ["v=STSv1;", "v=STSv1 ; bad"],
        ["v=spf1 -all", "v=STSv1; id=1", "v=STSv1; id=2", "v=STSv1; id=3"],
    ],
    ids=["two-ids", "identical", "one-invalid", "both-invalid", "three-among-others"],
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
        (DNSNotFound("_mta-sts.example.com TXT: NXDOMAIN"), NoRecordError, "no MTA-STS record"),
        (
            DNSNotFound("_mta-sts.example.com TXT: no TXT record"),
            NoRecordError,
            "no MTA-STS record",
        ),
        (DNSTemporaryError("_mta-sts.example.com TXT: SERVFAIL"), DNSError, "DNS lookup failed"),
        (
            DNSTemporaryError("_mta-sts.example.com TXT: timed out after 5.0s"),
            DNSError,
            "DNS lookup failed",
        ),
    ],
    ids=["nxdomain", "nodata", "servfail", "timeout"],
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
        (http_status(URL, 404), NoPolicyError, "no policy served", "sts-policy-fetch-error"),
        (http_status(URL, 500), PolicyFetchError, "policy fetch failed", "sts-policy-fetch-error"),
        (http_status(URL, 301), PolicyFetchError, "policy fetch failed", "sts-policy-fetch-error"),
        (http_status(URL, 410), PolicyFetchError, "policy fetch failed", "sts-policy-fetch-error"),
        (
            CertificateError(f"{URL}: certificate has expired"),
            PolicyFetchError,
            "policy fetch failed",
            "sts-webpki-invalid",
        ),
        (
            FetchError(f"{URL}: media type text/html, expected text/plain"),
            PolicyFetchError,
            "policy fetch failed",
            "sts-policy-fetch-error",
        ),
        (
            FetchError(f"{URL}: larger than 65536 bytes"),
            PolicyFetchError,
            "policy fetch failed",
            "sts-policy-fetch-error",
        ),
    ],
    ids=["404", "500", "redirect", "410", "certificate", "media-type", "too-large"],
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
    [b"", b"<html>It works!</html>\n", policy_text(*BASE[:3]).encode(), b"\xff\xfe"],
    ids=["empty", "html", "missing-max-age", "not-utf8"],
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
        (DNSNotFound("_mta-sts.example.com TXT: NXDOMAIN"), NoRecordError),
        (DNSTemporaryError("_mta-sts.example.com TXT: SERVFAIL"), DNSError),
        (["v=STSv1; id=1", "v=STSv1; id=2"], MultipleRecordsError),
        (["v=STSv1; id=a-b"], RecordSyntaxError),
        (["v=spf1 -all"], NoRecordError),
    ],
    ids=["nxdomain", "servfail", "two-records", "invalid-record", "no-sts-record"],
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
        (http_status(URL, 404), NoPolicyError, HTTPStatusError),
        (http_status(URL, 503), PolicyFetchError, HTTPStatusError),
        (CertificateError(f"{URL}: certificate for another name"), PolicyFetchError, CertificateError),
        (FetchError(f"{URL}: timed out after 10.0s"), PolicyFetchError, FetchError),
        (b"version: STSv1\n", PolicySyntaxError, type(None)),
        (b"\xff", PolicySyntaxError, UnicodeDecodeError),
    ],
    ids=["404", "503", "certificate", "timeout", "invalid-policy", "not-utf8"],
)  # fmt: skip
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

LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True).filter(
    lambda label: not label.startswith("xn--")
)
HOSTNAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join).filter(is_hostname)
FIELD_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", fullmatch=True)
# sts-policy-vchar: visible ASCII or any UTF-8 encodable non-ASCII character.
POLICY_VCHARS = st.characters(min_codepoint=0x21, exclude_characters="\x7f", codec="utf-8")
POLICY_EXT_VALUES = st.builds(
    lambda first, middle, last: first + middle + last,
    POLICY_VCHARS,
    st.text(alphabet=st.one_of(st.just(" "), POLICY_VCHARS), max_size=20),
    st.one_of(st.just(""), POLICY_VCHARS),
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
    queues = {"mx": [("mx", random_case(draw, str(pattern))) for pattern in mx], "ext": extensions}
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


@settings(max_examples=300, deadline=None)
@given(valid_policies())
def test_generated_valid_policies_parse_to_their_values(case: tuple[str, Policy]) -> None:
    text, expected = case
    assert parse_policy(text) == expected
    assert parse_policy(text.encode("utf-8")) == expected


@st.composite
def valid_records(draw: st.DrawFn) -> tuple[str, Record]:
    record_id = draw(st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True))
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
