"""Postfix's side of the table, ``postfix_mtasts.postfix``: lookup keys in, socketmap replies out.

Pure functions, so the tests are tables of keys and policies with the answers Postfix must see
(../shared/reference/postfix.md, TLS_README "TLS policy table"), and hypothesis properties: no key
makes ``policy_domain`` raise or return anything but a lowercase A-label name with a dot, and no
policy that parses (or any other Policy value) produces a reply Postfix would reject.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postfix_mtasts.config import Profile
from postfix_mtasts.mtasts import MX, Mode, Policy, is_hostname, parse_policy
from postfix_mtasts.postfix import NOTFOUND, match_patterns, policy_domain, policy_reply, temp

NOTFOUND_PROFILE = Profile(testing="notfound")
MAY_PROFILE = Profile(testing="may")
SECURE_PROFILE = Profile(testing="secure")
PROFILES = (NOTFOUND_PROFILE, MAY_PROFILE, SECURE_PROFILE)

# What Postfix accepts from us for an MTA-STS domain: a level, a non-empty colon-separated list
# of host names (".name" for "below name"), SNI with the MX host name. Nothing else can pass.
SECURE_REPLY = re.compile(r"OK secure match=([a-z0-9.-]+(?::[a-z0-9.-]+)*) servername=hostname")


def policy(mode: str, *mx: str, max_age: int = 86400) -> Policy:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return parse_policy("\n".join(lines) + "\n", "example.com")


# --------------------------------------------------------------------------------------------------
# policy_domain(): keys in.


@pytest.mark.parametrize(
    ("key", "domain"),
    [
        ("example.com", "example.com"),
        # Keys arrive in their original case; the table is not case-folded by Postfix.
        ("Example.COM", "example.com"),
        ("EXAMPLE.COM", "example.com"),
        # A trailing dot is the same domain.
        ("example.com.", "example.com"),
        ("Mail.Example.Org.", "mail.example.org"),
        ("a.b.c.example.com", "a.b.c.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("foo-bar.example", "foo-bar.example"),
        ("123.example", "123.example"),
        # "--" in positions 3 and 4 outside an A-label (R-LDH): a real host name all the same.
        ("r3---sn-abc.example", "r3---sn-abc.example"),
        (f"{'a' * 63}.example", f"{'a' * 63}.example"),
    ],
)
def test_domain_keys_are_lowercased_without_trailing_dot(key: str, domain: str) -> None:
    assert policy_domain(key) == domain


@pytest.mark.parametrize(
    ("key", "domain"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("BÜCHER.EXAMPLE.", "xn--bcher-kva.example"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("mail.bücher.example", "mail.xn--bcher-kva.example"),
        # IDNA2008, not IDNA2003: ß is kept, not mapped to "ss".
        ("faß.de", "xn--fa-hia.de"),
        ("bücher.example:25", "xn--bcher-kva.example"),
    ],
)
def test_unicode_keys_become_a_labels(key: str, domain: str) -> None:
    assert policy_domain(key) == domain


@pytest.mark.parametrize(
    ("key", "domain"),
    [
        ("example.com:25", "example.com"),
        ("example.net:587", "example.net"),
        ("Example.COM:25", "example.com"),
        ("example.com.:25", "example.com"),
    ],
)
def test_domain_with_port_is_looked_up_as_the_domain(key: str, domain: str) -> None:
    assert policy_domain(key) == domain


@pytest.mark.parametrize(
    "key",
    [
        # Parent-domain probes after a miss (RFC 8461 §3.4: no inheritance).
        ".example.com",
        ".com",
        ".b.example.com",
        ".Example.COM.",
        ".",
        "..example.com",
    ],
)
def test_parent_domain_probes_have_no_policy(key: str) -> None:
    assert policy_domain(key) is None


@pytest.mark.parametrize(
    "key",
    [
        # Literal next hops: no MX lookup chose the host (RFC 8461 §3.4).
        "[mx.example.org]",
        "[mx.example.org]:587",
        "[Mail.Example.COM]:25",
        "[192.0.2.1]",
        "[192.0.2.1]:25",
        "[ipv6:2001:db8::1]",
        "[ipv6:2001:db8::1]:25",
        "[example.com",
    ],
)
def test_literal_next_hops_have_no_policy(key: str) -> None:
    assert policy_domain(key) is None


@pytest.mark.parametrize(
    "key",
    [
        "192.0.2.1",
        "192.0.2.1:25",
        "127.0.0.1",
        "127.0.0.1.",
        "10.0.0.1:587",
        "::1",
        "2001:db8::1",
        "2001:db8::1:25",
        "fe80::1%eth0",
        "ipv6:2001:db8::1",
        "::ffff:192.0.2.1",
        # Full-width digits map to an IPv4 address under UTS #46.
        "\uff11\uff12\uff17.\uff10.\uff10.\uff11",
    ],
)
def test_ip_addresses_have_no_policy(key: str) -> None:
    assert policy_domain(key) is None


@pytest.mark.parametrize(
    "key",
    [
        "",
        # A single label has no mta-sts.<domain> to fetch from.
        "localhost",
        "com",
        "Localhost.",
        "localhost:25",
        # Not host names.
        "exa mple.com",
        "example.com foo",
        "example..com",
        "example.com..",
        "-example.com",
        "example-.com",
        "ex_ample.com",
        "*.example.com",
        "example.com/path",
        "user@example.com",
        "example.com\x00",
        "{ example.com }",
        "example.123",
        "xn--zz.example",
        # Ports that are not ports.
        "example.com:",
        "example.com:smtp",
        "example.com:25:25",
        ":25",
        # str.isdigit() is true for these; a port is ASCII digits.
        "example.com:\u0661\u0662",
        "example.com:\u00b2",
        "example.com:\uff12\uff15",
        "bücher.example:\u0662\u0665",
        # Too long: a label over 63 octets, a name over 253.
        f"{'a' * 64}.example",
        ".".join(["a" * 63] * 4) + ".com",
        "a." * 200 + "com",
        "x" * 20000,
    ],
)
def test_keys_that_are_not_domain_names_have_no_policy(key: str) -> None:
    assert policy_domain(key) is None


@pytest.mark.parametrize(
    "key",
    [" example.com", "example.com ", "\texample.com", "example.com\n", " example.com:25"],
)
def test_keys_with_surrounding_whitespace_are_not_domain_names(key: str) -> None:
    # Postfix sends the next hop without whitespace; a key with some is not a domain name, and
    # must not be looked up as one (issue 3: such keys are answered NOTFOUND at once).
    assert policy_domain(key) is None


def test_longest_valid_name_is_accepted() -> None:
    # 253 octets: three labels of 63, one of 61.
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    assert policy_domain(name) == name
    assert policy_domain(name + ".") == name
    assert policy_domain(name + "d") is None


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"
)
HOSTNAME = st.lists(LABEL, min_size=2, max_size=5).map(".".join).filter(is_hostname)


@given(st.text(max_size=300))
@settings(max_examples=500)
def test_any_key_gives_none_or_a_lowercase_a_label_domain(key: str) -> None:
    domain = policy_domain(key)
    if domain is not None:
        assert is_hostname(domain)
        assert "." in domain
        assert domain == domain.lower()
        assert policy_domain(domain) == domain


@given(HOSTNAME, st.integers(min_value=1, max_value=65535))
def test_case_trailing_dot_and_port_do_not_change_the_domain(name: str, port: int) -> None:
    assert policy_domain(name) == name
    assert policy_domain(name.upper()) == name
    assert policy_domain(name + ".") == name
    assert policy_domain(f"{name}:{port}") == name
    assert policy_domain(f".{name}") is None
    assert policy_domain(f"[{name}]") is None
    assert policy_domain(f"[{name}]:{port}") is None


# --------------------------------------------------------------------------------------------------
# policy_reply(): replies out.


@pytest.mark.parametrize("profile", PROFILES)
def test_enforce_policy_is_secure_with_its_mx_patterns(profile: Profile) -> None:
    enforce = policy("enforce", "mail.example.com", "backup.example.org")
    assert (
        policy_reply(enforce, profile)
        == "OK secure match=mail.example.com:backup.example.org servername=hostname"
    )


def test_patterns_keep_the_policy_order() -> None:
    enforce = policy("enforce", "z.example.com", "a.example.com", "m.example.com")
    assert (
        policy_reply(enforce, NOTFOUND_PROFILE)
        == "OK secure match=z.example.com:a.example.com:m.example.com servername=hostname"
    )


def test_wildcard_pattern_is_written_with_a_leading_dot() -> None:
    enforce = policy("enforce", "mail.example.com", "*.example.net")
    assert (
        policy_reply(enforce, NOTFOUND_PROFILE)
        == "OK secure match=mail.example.com:.example.net servername=hostname"
    )


def test_duplicate_patterns_are_written_once_at_their_first_place() -> None:
    enforce = policy(
        "enforce",
        "b.example.com",
        "*.example.net",
        "a.example.com",
        "B.Example.COM",
        "*.EXAMPLE.net",
        "b.example.com",
    )
    assert (
        policy_reply(enforce, NOTFOUND_PROFILE)
        == "OK secure match=b.example.com:.example.net:a.example.com servername=hostname"
    )


def test_wildcard_and_exact_name_of_one_domain_are_different_patterns() -> None:
    enforce = policy("enforce", "*.example.net", "example.net")
    assert match_patterns(enforce) == [".example.net", "example.net"]


@pytest.mark.parametrize(
    ("profile", "reply"),
    [
        (NOTFOUND_PROFILE, NOTFOUND),
        (MAY_PROFILE, "OK may"),
        (SECURE_PROFILE, "OK secure match=mail.example.com:.example.net servername=hostname"),
    ],
)
def test_testing_policy_answers_as_the_profile_says(profile: Profile, reply: str) -> None:
    testing = policy("testing", "mail.example.com", "*.example.net")
    assert policy_reply(testing, profile) == reply


def test_testing_is_notfound_by_default() -> None:
    testing = policy("testing", "mail.example.com")
    assert policy_reply(testing, Profile()) == NOTFOUND


@pytest.mark.parametrize("profile", PROFILES)
def test_none_policy_is_notfound(profile: Profile) -> None:
    assert policy_reply(policy("none"), profile) == "NOTFOUND "
    # A "none" policy that still lists mx lines is no policy either (RFC 8461 §5).
    assert policy_reply(policy("none", "mail.example.com"), profile) == "NOTFOUND "


@pytest.mark.parametrize("profile", PROFILES)
def test_no_policy_is_notfound(profile: Profile) -> None:
    assert policy_reply(None, profile) == "NOTFOUND "


def test_notfound_has_its_space() -> None:
    # socketmap_table(5): the status word, then a space, even with nothing after it.
    assert NOTFOUND == "NOTFOUND "


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("mode", [Mode.ENFORCE, Mode.TESTING])
def test_policy_without_usable_mx_is_never_match_with_an_empty_list(
    mode: Mode, profile: Profile
) -> None:
    # Not what parse_policy makes, but policy_reply validates whatever reaches it.
    for mx in [(), (MX(False, "bad name"), MX(True, "x:y"), MX(False, ""))]:
        empty = Policy(version="STSv1", mode=mode, mx=mx, max_age=86400)
        reply = policy_reply(empty, profile)
        assert "match=" not in reply or SECURE_REPLY.fullmatch(reply)
        assert "match= " not in reply
        assert reply.strip() != "OK"
        if mode is Mode.ENFORCE:
            assert reply == NOTFOUND


@pytest.mark.parametrize(
    "bad",
    [
        "evil.example servername=other",
        "a.example:b.example",
        "a.example }",
        "{ a.example",
        "a.example\nOK",
        "A.EXAMPLE.COM",
        "a.example=b",
        "",
        "*.example.com",
        "192.0.2.1",
    ],
)
def test_mx_values_that_are_not_host_names_never_reach_the_reply(bad: str) -> None:
    hostile = Policy(
        version="STSv1",
        mode=Mode.ENFORCE,
        mx=(MX(False, bad), MX(True, bad), MX(False, "mail.example.com")),
        max_age=86400,
    )
    assert (
        policy_reply(hostile, NOTFOUND_PROFILE)
        == "OK secure match=mail.example.com servername=hostname"
    )


def test_temp_reply_starts_with_temp() -> None:
    assert temp("starting") == "TEMP starting"


# --------------------------------------------------------------------------------------------------
# Properties: whatever the policy, the reply is one Postfix accepts.

MX_VALUE = st.builds(
    lambda wildcard, name, upper: ("*." if wildcard else "") + (name.upper() if upper else name),
    st.booleans(),
    HOSTNAME,
    st.booleans(),
)
EXTENSION = st.from_regex(r"[a-z][a-z0-9_.-]{0,10}: [!-~]{1,20}", fullmatch=True).filter(
    lambda line: not line.startswith(("mx:", "mode:", "version:", "max_age:"))
)


@st.composite
def policy_texts(draw: st.DrawFn) -> str:
    mode = draw(st.sampled_from(["enforce", "testing", "none"]))
    mx = draw(st.lists(MX_VALUE, min_size=0 if mode == "none" else 1, max_size=8))
    fields = [
        "version: STSv1",
        f"mode: {mode}",
        *(f"mx: {m}" for m in mx),
        f"max_age: {draw(st.integers(0, 10**10 - 1))}",
        *draw(st.lists(EXTENSION, max_size=3)),
    ]
    # "version" need not come first (RFC 8461 §3.2 fixes no order); LF or CRLF line ends.
    lines = draw(st.permutations(fields))
    return "".join(line + draw(st.sampled_from(["\n", "\r\n"])) for line in lines)


def check_reply(reply: str, parsed: Policy, profile: Profile) -> None:
    if reply in (NOTFOUND, "OK may"):
        assert reply == NOTFOUND or (parsed.mode is Mode.TESTING and profile.testing == "may")
        return
    match = SECURE_REPLY.fullmatch(reply)
    assert match is not None, reply
    patterns = match.group(1).split(":")
    assert all(patterns)
    assert len(patterns) == len(set(patterns))
    expected: list[str] = []
    for mx in parsed.mx:
        pattern = f".{mx.domain}" if mx.wildcard else mx.domain
        if pattern not in expected:
            expected.append(pattern)
    assert patterns == expected


@given(policy_texts(), st.sampled_from(PROFILES))
@settings(max_examples=300)
def test_every_parsed_policy_gives_notfound_or_a_strict_secure_reply(
    text: str, profile: Profile
) -> None:
    parsed = parse_policy(text, "example.com")
    reply = policy_reply(parsed, profile)
    check_reply(reply, parsed, profile)
    if parsed.mode is Mode.ENFORCE:
        assert reply.startswith("OK secure match=")
    if parsed.mode is Mode.NONE:
        assert reply == NOTFOUND


@given(
    st.sampled_from(list(Mode)),
    st.lists(st.tuples(st.booleans(), st.text(max_size=40)), max_size=6),
    st.sampled_from(PROFILES),
)
def test_any_policy_value_gives_notfound_or_a_strict_reply(
    mode: Mode, mx: list[tuple[bool, str]], profile: Profile
) -> None:
    value = Policy(
        version="STSv1", mode=mode, mx=tuple(MX(w, name) for w, name in mx), max_age=86400
    )
    reply = policy_reply(value, profile)
    assert reply in (NOTFOUND, "OK may") or SECURE_REPLY.fullmatch(reply), reply
    assert not reply.startswith("OK") or len(reply) > len("OK ")


@given(
    st.text(
        alphabet=st.sampled_from("abcxnXN019-.:[] \u00fc"),
        min_size=1,
        max_size=40,
    )
)
def test_the_fast_path_for_plain_keys_agrees_with_the_general_rules(key: str) -> None:
    from postfix_mtasts.postfix import _general_policy_domain

    assert policy_domain(key) == _general_policy_domain(key)
