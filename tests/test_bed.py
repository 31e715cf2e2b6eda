"""The test bed itself works: DNS through unbound and knot, updates, the HTTPS policy hosts."""

from __future__ import annotations

import http.client
import socket
import ssl
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
from bed import POLICY_PATH, SCENARIOS, Bed, domain_of


def _resolver(nameserver: str) -> dns.resolver.Resolver:
    host, port = nameserver.rsplit(":", 1)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)
    resolver.lifetime = 3.0
    return resolver


def _txt(bed: Bed, name: str) -> list[str]:
    answer = _resolver(bed.resolver_nameservers[0]).resolve(name, "TXT")
    return sorted(b"".join(rdata.strings).decode() for rdata in answer)


def _get(
    bed: Bed, host: str, *, timeout: float = 5.0, ca_file: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET the policy from ``host`` at the bed's HTTPS address, verifying its certificate."""
    context = ssl.create_default_context(cafile=ca_file or bed.ca_file)
    with (
        socket.create_connection((bed.https_address, bed.https_port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        request = f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        tls.sendall(request.encode())
        response = http.client.HTTPResponse(tls)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


def test_unbound_resolves_every_scenario_record(bed: Bed) -> None:
    for label, scenario in SCENARIOS.items():
        if scenario.txt:
            assert _txt(bed, f"_mta-sts.{domain_of(label)}") == sorted(scenario.txt), label


def test_policy_hosts_resolve_to_the_https_server(bed: Bed) -> None:
    answer = _resolver(bed.resolver_nameservers[0]).resolve(f"mta-sts.{domain_of('enforce')}", "A")
    assert [rdata.address for rdata in answer] == [bed.https_address]


def test_cname_chain_is_followed_to_the_txt_record(bed: Bed) -> None:
    answer = _resolver(bed.resolver_nameservers[0]).resolve(
        f"_mta-sts.{bed.domain('cname')}", "TXT"
    )
    assert answer.response.answer[0].rdtype == dns.rdatatype.CNAME
    assert len(answer.response.answer) == 3  # two CNAME hops, then the TXT
    assert [b"".join(r.strings).decode() for r in answer] == [SCENARIOS["cname"].records[2][2]]


def test_missing_record_is_nxdomain(bed: Bed) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        _txt(bed, f"_mta-sts.{bed.domain('norecord')}")


def test_knot_answers_authoritatively(bed: Bed) -> None:
    host, port = bed.auth_nameservers[0].rsplit(":", 1)
    query = dns.message.make_query(f"_mta-sts.{bed.domain('enforce')}", "TXT")
    answer = dns.query.udp(query, host, port=int(port), timeout=2)
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.flags & dns.flags.AA


def test_dynamic_update_is_visible_through_unbound_at_once(bed: Bed) -> None:
    name = f"_mta-sts.{bed.unique_domain()}"
    bed.dns_set(name, "TXT", ["v=STSv1; id=one;"])
    assert _txt(bed, name) == ["v=STSv1; id=one;"]
    bed.dns_set(name, "TXT", ["v=STSv1; id=two;", ("v=STSv1; ", "id=three;")])
    assert _txt(bed, name) == ["v=STSv1; id=three;", "v=STSv1; id=two;"]
    bed.dns_delete(name, "TXT")
    with pytest.raises(dns.resolver.NXDOMAIN):
        _txt(bed, name)


def test_long_txt_values_are_split_into_255_byte_strings(bed: Bed) -> None:
    name = f"_mta-sts.{bed.unique_domain()}"
    value = "v=STSv1; id=long; " + "x" * 600
    bed.dns_set(name, "TXT", [value])
    answer = _resolver(bed.resolver_nameservers[0]).resolve(name, "TXT")
    assert [len(s) for s in answer[0].strings] == [255, 255, len(value) - 510]


def test_dead_nameserver_never_answers(bed: Bed) -> None:
    host, port = bed.dead_nameserver.rsplit(":", 1)
    query = dns.message.make_query(f"_mta-sts.{bed.domain('enforce')}", "TXT")
    started = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(query, host, port=int(port), timeout=0.5)
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(query, host, port=int(port), timeout=0.5)
    assert time.monotonic() - started < 3


def test_https_serves_the_scenario_policy_and_counts_requests(bed: Bed) -> None:
    host = f"mta-sts.{bed.domain('enforce')}"
    before = bed.https.request_count(host)
    status, headers, body = _get(bed, host)
    assert (status, headers["Content-Type"], body) == (
        200,
        "text/plain",
        SCENARIOS["enforce"].response.body,  # type: ignore[union-attr]
    )
    assert bed.https.request_count(host) == before + 1
    request = bed.https.requests(host)[-1]
    assert (request.sni, request.path) == (host, POLICY_PATH)


def test_https_counts_are_per_host_and_reset(bed: Bed) -> None:
    host = f"mta-sts.{bed.unique_domain()}"
    bed.https.set(host, body=b"x")
    _get(bed, host)
    _get(bed, host)
    assert bed.https.request_count(host) == 2
    bed.https.reset_counts()
    assert bed.https.request_count(host) == 0


@pytest.mark.parametrize(
    ("cert", "reason"),
    [
        ("expired", "certificate has expired"),
        ("wrongname", "Hostname mismatch"),
        ("untrusted", "unable to get local issuer certificate"),
    ],
)
def test_https_presents_the_certificate_kind_asked_for(bed: Bed, cert: str, reason: str) -> None:
    host = f"mta-sts.{bed.unique_domain()}"
    bed.https.set(host, body=b"x", cert=cert)  # type: ignore[arg-type]
    with pytest.raises(ssl.SSLCertVerificationError, match=reason):
        _get(bed, host)
    assert bed.https.request_count(host) == 0


def test_https_status_headers_and_content_type_are_configurable(bed: Bed) -> None:
    host = f"mta-sts.{bed.unique_domain()}"
    bed.https.set(host, status=301, content_type="text/html", headers={"Location": "https://x/"})
    status, headers, _ = _get(bed, host)
    assert (status, headers["Location"], headers["Content-Type"]) == (
        301,
        "https://x/",
        "text/html",
    )


def test_https_oversized_scenario_body(bed: Bed) -> None:
    _, headers, body = _get(bed, f"mta-sts.{bed.domain('oversized')}")
    assert len(body) == int(headers["Content-Length"]) == 70000


def test_https_unknown_host_is_404(bed: Bed) -> None:
    assert _get(bed, f"mta-sts.{bed.unique_domain()}")[0] == 404


def test_https_delay_and_drip_slow_the_answer_down(bed: Bed) -> None:
    host = f"mta-sts.{bed.unique_domain()}"
    bed.https.set(host, body=b"abcd", delay=0.3, drip=(1, 0.2))
    started = time.monotonic()
    assert _get(bed, host)[2] == b"abcd"
    assert time.monotonic() - started >= 0.3 + 3 * 0.2


def test_https_hang_never_answers_and_blocks_no_one_else(bed: Bed) -> None:
    host = f"mta-sts.{bed.unique_domain()}"
    bed.https.set(host, hang=True)
    with pytest.raises(TimeoutError):
        _get(bed, host, timeout=0.5)
    assert bed.https.request_count(host) == 1
    assert _get(bed, f"mta-sts.{bed.domain('enforce')}")[0] == 200
