"""Postfix's side of the table: lookup keys in, TLS policy strings out.

Postfix asks ``smtp_tls_policy_maps`` with the next-hop destination exactly as it has it: the
recipient domain in its original case, possibly internationalised, or a transport/relayhost nexthop
such as ``[mx.example.org]:587`` or ``example.net:25``; after a miss it probes parent domains as
``.example.com``. :func:`policy_domain` turns a key into the one MTA-STS policy domain it stands
for, or ``None`` when no MTA-STS policy can apply, so such keys never cost a DNS query.

:func:`policy_reply` turns an MTA-STS policy into the socketmap reply payload (TLS_README, "TLS
policy table"). Every piece of text that reaches a reply is validated here, whatever produced it.
"""

from __future__ import annotations

import ipaddress
import logging
import re

from postfix_mtasts.config import Profile
from postfix_mtasts.dane import DaneResult, DaneState
from postfix_mtasts.mtasts import Mode, Policy, is_hostname, to_alabel
from postfix_mtasts.netstring import MAX_REPLY

log = logging.getLogger("postfix_mtasts.postfix")

__all__ = [
    "NOTFOUND",
    "dane_reply",
    "match_patterns",
    "policy_domain",
    "policy_reply",
    "temp",
    "tlsrpt_attributes",
]

# socketmap_table(5): the status word, then a space, even when nothing follows.
NOTFOUND = "NOTFOUND "


# The common key, an ASCII domain name of two or more labels whose last label starts with a
# letter: accepted as it is, without the general checks below (it is a host name by
# construction). A-labels (xn--) take the general path, which checks that they decode.
_PLAIN_DOMAIN = re.compile(
    r"(?:(?!xn--)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?!xn--)[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
)


def policy_domain(key: str) -> str | None:
    """The policy domain a Postfix lookup key stands for; ``None`` when no MTA-STS policy applies.

    ``None`` for parent-domain probes (``.example.com``: RFC 8461 §3.4, no inheritance), literal
    next hops (``[host]``, ``[host]:port``: no MX lookup chose the host), IP addresses and anything
    that is not a domain name. ``domain:port`` stands for ``domain``.
    """
    if key.isascii():
        plain = key.lower()
        if len(plain) <= 253 and _PLAIN_DOMAIN.fullmatch(plain) is not None:
            # The key itself when it is already in lowercase: the caches keep one string for it.
            return key if plain == key else plain
    return _general_policy_domain(key)


def _general_policy_domain(key: str) -> str | None:
    if not key or key[0] in ".[" or any(c.isspace() for c in key):
        return None
    host, colon, port = key.rpartition(":")
    if colon:
        # str.isdigit() alone is true for "²" and "٢٥" too: a port is ASCII digits.
        if not (port.isascii() and port.isdigit()) or not host or ":" in host:
            # An IPv6 address, or a port that is not a number: not a domain.
            return None
        key = host
    try:
        ipaddress.ip_address(key)
    except ValueError:
        pass
    else:
        return None
    try:
        domain = to_alabel(key)
    except ValueError:
        return None
    # A name with a single label (or none left after the dot) has no MTA-STS host to fetch from.
    if "." not in domain:
        return None
    return domain


def _valid_host(name: str) -> bool:
    # The common case by one regular expression, the rest by the full rules.
    return _PLAIN_DOMAIN.fullmatch(name) is not None or is_hostname(name)


def match_patterns(policy: Policy) -> list[str]:
    """The ``match=`` list for a policy: its ``mx`` patterns in policy order, duplicates removed,
    ``*.example.net`` written ``.example.net`` (Postfix's form for "a name below example.net")."""
    patterns: list[str] = []
    for mx in policy.mx:
        # Parsed mx values are host names already; check again so that no other producer of a
        # Policy can put text into the reply.
        if not _valid_host(mx.domain):
            continue
        pattern = f".{mx.domain}" if mx.wildcard else mx.domain
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


def policy_reply(
    policy: Policy | None,
    profile: Profile,
    domain: str = "",
    policy_text: str | None = None,
) -> str:
    """The socketmap reply payload for the usable policy of a domain (``None``: no policy).

    With ``profile.tlsrpt``, a ``secure`` answer also carries the TLSRPT attributes of Postfix
    3.10 and newer (TLSRPT_README), which need the policy ``domain`` and the ``policy_text`` as
    served.
    """
    if policy is None or policy.mode is Mode.NONE:
        return NOTFOUND
    if policy.mode is Mode.TESTING:
        if profile.testing == "notfound":
            return NOTFOUND
        if profile.testing == "may":
            return "OK may"
    patterns = match_patterns(policy)
    if not patterns:
        # Never "match=" with an empty list: Postfix would reject the whole policy.
        return NOTFOUND
    reply = f"OK secure match={':'.join(patterns)} servername=hostname"
    if profile.tlsrpt and is_hostname(domain):
        reply += tlsrpt_attributes(policy, domain, policy_text, len(reply))
    return reply


def tlsrpt_attributes(policy: Policy, domain: str, policy_text: str | None, used: int = 0) -> str:
    """The TLSRPT attributes of an MTA-STS answer (Postfix 3.10 TLSRPT_README), each preceded by
    a space: ``policy_type=sts policy_domain=D``, one ``mx_host_pattern`` per policy ``mx`` line
    and one ``{ policy_string = LINE }`` per line of the policy as served.

    The patterns keep the policy's ``*.`` form: Postfix 3.10.5 and newer matches MX hosts against
    them itself, and the ``.example.net`` form of ``match=`` would make it skip every MX. A line
    containing ``{`` or ``}`` cannot be written inside ``{ }`` and is left out. When the whole
    reply would exceed the socketmap limit (``used`` bytes are taken already), the policy lines
    are left out and that is logged.
    """
    parts = [" policy_type=sts", f" policy_domain={domain}"]
    parts.extend(f" mx_host_pattern={mx}" for mx in policy.mx if _valid_host(mx.domain))
    head = "".join(parts)
    lines: list[str] = []
    for line in (policy_text or "").split("\n"):
        # Tabs are whitespace to Postfix too; a CR is part of the line end.
        line = line.rstrip("\r").replace("\t", " ").strip()
        if line and "{" not in line and "}" not in line and line.isprintable():
            lines.append(f" {{ policy_string = {line} }}")
    body = "".join(lines)
    if used + len((head + body).encode()) > MAX_REPLY:
        log.warning(
            "%s: policy too large for the TLSRPT policy_string attributes; sent without them",
            domain,
        )
        return head
    return head + body


def dane_reply(verdict: DaneResult) -> str | None:
    """The reply for a DANE verdict, or ``None`` when DANE does not apply (MTA-STS decides).

    DANE answers carry no TLSRPT attributes: Postfix reports DANE itself."""
    state = verdict.state
    if state is DaneState.DANE_ONLY:
        return "OK dane-only"
    if state is DaneState.DANE:
        return "OK dane"
    if state is DaneState.NULL_MX:
        return NOTFOUND
    if state is DaneState.TEMP:
        return temp(f"DANE lookup for {verdict.domain} failed: {verdict.reason}")
    return None


def temp(reason: str) -> str:
    """A ``TEMP`` reply: Postfix defers the delivery and tries again later. (The server's encoder
    shortens the reason and makes it printable ASCII.)"""
    return f"TEMP {reason}"
