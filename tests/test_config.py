"""config.py: every key read, every mistake named with its file and key, dump() read back."""

from __future__ import annotations

import os
import pwd
import socket
import ssl
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from postfix_mtasts import config
from postfix_mtasts.config import Config, ConfigError, Profile, dump, load, loads

SOURCE = "/etc/postfix-mtasts/config.toml"

# One CA for the module: its certificate makes a CA file the fetch can use.
CA = trustme.CA()


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def log_dir(tmp_path: Path) -> str:
    """A directory for log files, so that no test creates one outside its own directory."""
    path = tmp_path / "log"
    path.mkdir()
    return str(path)


def fill(text: str, ca_file: str, log_dir: str) -> str:
    return text.replace("{ca}", ca_file).replace("{log}", log_dir)


def test_no_file_and_empty_file_give_the_defaults() -> None:
    assert loads("") == Config()
    c = Config()
    assert c.listen == ("inet:127.0.0.1:8461",)
    assert (c.server.max_connections, c.server.idle_timeout, c.server.request_timeout) == (
        1000,
        60.0,
        90.0,
    )
    assert c.server.socket_mode == 0o660
    assert (c.server.socket_owner, c.server.socket_group, c.server.user, c.server.group) == (
        "",
        "",
        "",
        "",
    )
    assert c.server.pid_file == "/run/postfix-mtasts/postfix-mtasts.pid"
    assert (c.log.level, c.log.syslog, c.log.syslog_facility, c.log.file) == (
        "info",
        False,
        "mail",
        "",
    )
    assert (c.dns.nameservers, c.dns.timeout, c.dns.lifetime) == ((), 5.0, 10.0)
    assert c.https == config.HttpsConfig("", 10.0, 5.0, False, "")
    assert c.cache.backend == "sqlite"
    assert c.cache.path == config.default_cache_path()
    assert (
        c.cache.txt_check_interval,
        c.cache.refresh_interval,
        c.cache.unused_after,
        c.cache.no_record_ttl,
        c.cache.fetch_retry_interval,
        c.cache.first_lookup_deadline,
    ) == (300.0, 86400.0, 2592000.0, 300.0, 300.0, 30.0)
    assert (c.cache.max_lookups, c.cache.memory_domains) == (100, 200000)
    assert c.policy == Profile("notfound", False)
    assert c.maps == {}
    assert c.dane == config.DaneConfig(False, "")


# Every key, set to something other than its default, and where it lands.
EVERY_KEY: list[tuple[str, Callable[[Config], object], object]] = [
    ('listen = ["unix:/run/m.sock", "inet:[::1]:8461", "systemd"]', lambda c: c.listen,
     ("unix:/run/m.sock", "inet:[::1]:8461", "systemd")),
    ('listen = ["systemd"]', lambda c: c.listen, ("systemd",)),
    ("[server]\nmax_connections = 100000", lambda c: c.server.max_connections, 100000),
    ("[server]\nmax_connections = 5", lambda c: c.server.max_connections, 5),
    ("[server]\nidle_timeout = 3600", lambda c: c.server.idle_timeout, 3600.0),
    ("[server]\nidle_timeout = 2.5", lambda c: c.server.idle_timeout, 2.5),
    ("[server]\nrequest_timeout = 99.9", lambda c: c.server.request_timeout, 99.9),
    ("[server]\nrequest_timeout = 7", lambda c: c.server.request_timeout, 7.0),
    ('[server]\nsocket_mode = "0600"', lambda c: c.server.socket_mode, 0o600),
    ('[server]\nsocket_mode = "2770"', lambda c: c.server.socket_mode, 0o2770),
    ('[server]\nsocket_mode = "666"', lambda c: c.server.socket_mode, 0o666),
    ('[server]\nsocket_owner = "postfix"', lambda c: c.server.socket_owner, "postfix"),
    ('[server]\nsocket_group = "postdrop"', lambda c: c.server.socket_group, "postdrop"),
    ('[server]\nuser = "mtasts"', lambda c: c.server.user, "mtasts"),
    ('[server]\ngroup = "mtasts"', lambda c: c.server.group, "mtasts"),
    ('[server]\npid_file = "/run/x/y.pid"', lambda c: c.server.pid_file, "/run/x/y.pid"),
    ('[server]\npid_file = ""', lambda c: c.server.pid_file, ""),
    ('[log]\nlevel = "debug"', lambda c: c.log.level, "debug"),
    ('[log]\nlevel = "warning"', lambda c: c.log.level, "warning"),
    ('[log]\nlevel = "error"', lambda c: c.log.level, "error"),
    ("[log]\nsyslog = true", lambda c: c.log.syslog, True),
    ('[log]\nsyslog_facility = "local3"', lambda c: c.log.syslog_facility, "local3"),
    ('[log]\nfile = "/dev/null"', lambda c: c.log.file, "/dev/null"),
    ('[log]\nfile = "{log}/mtasts.log"', lambda c: c.log.file, "{log}/mtasts.log"),
    ('[dns]\nnameservers = ["127.0.0.1:5353", "::1", "[2001:db8::53]:53", "192.0.2.1"]',
     lambda c: c.dns.nameservers, ("127.0.0.1:5353", "::1", "[2001:db8::53]:53", "192.0.2.1")),
    ("[dns]\ntimeout = 300", lambda c: c.dns.timeout, 300.0),
    ("[dns]\ntimeout = 1", lambda c: c.dns.timeout, 1.0),
    ("[dns]\nlifetime = 300.0", lambda c: c.dns.lifetime, 300.0),
    ("[dns]\nlifetime = 0.5", lambda c: c.dns.lifetime, 0.5),
    ('[https]\nca_file = "{ca}"', lambda c: c.https.ca_file, "{ca}"),
    ("[https]\ntimeout = 300", lambda c: c.https.timeout, 300.0),
    ("[https]\ntimeout = 3", lambda c: c.https.timeout, 3.0),
    ("[https]\nconnect_timeout = 300", lambda c: c.https.connect_timeout, 300.0),
    ("[https]\nconnect_timeout = 1.5", lambda c: c.https.connect_timeout, 1.5),
    ("[https]\nallow_private_addresses = true", lambda c: c.https.allow_private_addresses, True),
    ('[https]\nproxy = "http://proxy.example:3128"', lambda c: c.https.proxy,
     "http://proxy.example:3128"),
    ('[https]\nproxy = "https://u:p@[2001:db8::1]:8443/"', lambda c: c.https.proxy,
     "https://u:p@[2001:db8::1]:8443/"),
    ('[cache]\nbackend = "memory"', lambda c: c.cache.backend, "memory"),
    ('[cache]\npath = "/srv/cache.db"', lambda c: c.cache.path, "/srv/cache.db"),
    ("[cache]\ntxt_check_interval = 31557600", lambda c: c.cache.txt_check_interval, 31557600.0),
    ("[cache]\ntxt_check_interval = 60", lambda c: c.cache.txt_check_interval, 60.0),
    ("[cache]\ntxt_check_interval = 0", lambda c: c.cache.txt_check_interval, 0.0),
    ("[cache]\nrefresh_interval = 31557600", lambda c: c.cache.refresh_interval, 31557600.0),
    ("[cache]\nrefresh_interval = 3600", lambda c: c.cache.refresh_interval, 3600.0),
    ("[cache]\nunused_after = 315576000", lambda c: c.cache.unused_after, 315576000.0),
    ("[cache]\nunused_after = 86400", lambda c: c.cache.unused_after, 86400.0),
    ("[cache]\nno_record_ttl = 31557600", lambda c: c.cache.no_record_ttl, 31557600.0),
    ("[cache]\nno_record_ttl = 0", lambda c: c.cache.no_record_ttl, 0.0),
    ("[cache]\nfetch_retry_interval = 31557600", lambda c: c.cache.fetch_retry_interval,
     31557600.0),
    ("[cache]\nfetch_retry_interval = 0.2", lambda c: c.cache.fetch_retry_interval, 0.2),
    ("[cache]\nfirst_lookup_deadline = 99.5", lambda c: c.cache.first_lookup_deadline, 99.5),
    ("[cache]\nmax_lookups = 1", lambda c: c.cache.max_lookups, 1),
    ("[cache]\nmax_lookups = 10000", lambda c: c.cache.max_lookups, 10000),
    ("[cache]\nmax_lookups = 8", lambda c: c.cache.max_lookups, 8),
    ("[cache]\nmemory_domains = 10000000", lambda c: c.cache.memory_domains, 10000000),
    ("[cache]\nmemory_domains = 1000", lambda c: c.cache.memory_domains, 1000),
    ('[cache]\nurl = "unix:///run/redis/redis.sock?db=2"', lambda c: c.cache.url, "unix:///run/redis/redis.sock?db=2"),
    ('[cache]\nprefix = "mx:"', lambda c: c.cache.prefix, "mx:"),
    ('[cache]\ntable = "c_2"', lambda c: c.cache.table, "c_2"),
    ("[cache]\ntimeout = 0.25", lambda c: c.cache.timeout, 0.25),
    ('[policy]\ntesting = "may"', lambda c: c.policy.testing, "may"),
    ('[policy]\ntesting = "secure"', lambda c: c.policy.testing, "secure"),
    ("[policy]\ntlsrpt = true", lambda c: c.policy.tlsrpt, True),
    ('[maps.postfix]\ntesting = "secure"', lambda c: c.profile("postfix").testing, "secure"),
    ("[maps.postfix]\ntlsrpt = true", lambda c: c.profile("postfix").tlsrpt, True),
    ("[dane]\nenabled = true", lambda c: c.dane.enabled, True),
    ('[dane]\ncheck_name = "isc.org."', lambda c: c.dane.check_name, "isc.org."),
    ('[dane]\ncheck_name = "."', lambda c: c.dane.check_name, "."),
    ('[dane]\ncheck_name = "_25._tcp.mx.example"', lambda c: c.dane.check_name,
     "_25._tcp.mx.example"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "read", "expected"), EVERY_KEY)
def test_every_key_is_read(
    text: str, read: Callable[[Config], object], expected: object, ca_file: str, log_dir: str
) -> None:
    settings = loads(fill(text, ca_file, log_dir), SOURCE)
    if isinstance(expected, str):
        expected = fill(expected, ca_file, log_dir)
    assert read(settings) == expected


def test_integers_are_accepted_where_seconds_are_expected() -> None:
    settings = loads("[dns]\ntimeout = 2\n[cache]\nunused_after = 10")
    assert settings.dns.timeout == 2.0 and isinstance(settings.dns.timeout, float)
    assert isinstance(settings.cache.unused_after, float)


# A mistake, and the key and cause its message must name.
MISTAKES: list[tuple[str, str, str]] = [
    ('listen = "inet:127.0.0.1:8461"', "listen", "expected an array of strings"),
    ("listen = [8461]", "listen[0]", "expected a string, got 8461"),
    ('listen = [""]', "listen[0]", "expected inet:HOST:PORT, unix:PATH or systemd"),
    ('listen = ["inet:127.0.0.1"]', "listen[0]", "expected inet:HOST:PORT"),
    ('listen = ["systemd", "tcp:127.0.0.1:8461"]', "listen[1]", "unknown type 'tcp'"),
    ('listen = ["unix:run/mtasts.sock"]', "listen[0]", "must be absolute"),
    # A daemon listening nowhere answers no one.
    ("listen = []", "listen", 'at least one listener; use "systemd" for socket activation'),
    ("server = 1", "server", "expected a table, got 1"),
    ("[server]\nmax_connections = 0", "server.max_connections", "at least 1, got 0"),
    ("[server]\nmax_connections = 10.0", "server.max_connections", "expected an integer"),
    ("[server]\nmax_connections = true", "server.max_connections", "expected an integer"),
    ("[server]\nmax_connections = 100001", "server.max_connections",
     "at most 100000 and at least 1, got 100001"),
    ('[server]\nidle_timeout = "60s"', "server.idle_timeout", 'seconds, got "60s"'),
    ("[server]\nidle_timeout = 0", "server.idle_timeout", "more than 0, got 0"),
    ("[server]\nrequest_timeout = -1.0", "server.request_timeout", "more than 0"),
    ("[server]\nrequest_timeout = inf", "server.request_timeout", "got inf"),
    ("[server]\nrequest_timeout = true", "server.request_timeout", "seconds, got true"),
    # Postfix waits 100 s for a reply: a later answer is lost.
    ("[server]\nrequest_timeout = 200", "server.request_timeout",
     "less than 100 and more than 0, got 200 (Postfix gives up on a reply after 100 s)"),
    ("[server]\nrequest_timeout = 100", "server.request_timeout", "less than 100"),
    ("[server]\nidle_timeout = 3600.5", "server.idle_timeout",
     "at most 3600 and more than 0, got 3600.5"),
    ("[server]\nidle_timeout = 1e300", "server.idle_timeout", "at most 3600"),
    ("[server]\nsocket_mode = 660", "server.socket_mode", 'such as "0660", got 660'),
    ("[server]\nsocket_mode = 0o660", "server.socket_mode", "got 432"),
    ('[server]\nsocket_mode = "0880"', "server.socket_mode", 'got "0880"'),
    ('[server]\nsocket_mode = "10660"', "server.socket_mode", 'got "10660"'),
    ("[server]\nuser = 0", "server.user", "expected a string, got 0"),
    ("[server]\ngroup = []", "server.group", "expected a string, got an array"),
    ("[server]\nsocket_owner = 1", "server.socket_owner", "expected a string"),
    ("[server]\nsocket_group = {}", "server.socket_group", "got a table"),
    ('[server]\npid_file = "run/x.pid"', "server.pid_file", "expected an absolute path"),
    ('[log]\nlevel = "INFO"', "log.level", '"debug", "info", "warning" or "error", got "INFO"'),
    ('[log]\nsyslog = "yes"', "log.syslog", 'expected true or false, got "yes"'),
    ('[log]\nsyslog_facility = "mial"', "log.syslog_facility", 'got "mial"'),
    ('[log]\nfile = "mtasts.log"', "log.file", "expected an absolute path"),
    ('[log]\nfile = "/var/log/\\u0000"', "log.file", "cannot contain NUL"),
    ("[log]\nfile = 1979-05-27", "log.file", "expected a string, got a date or time"),
    ('[dns]\nnameservers = "127.0.0.1"', "dns.nameservers", "expected an array of strings"),
    ('[dns]\nnameservers = ["ns.example"]', "dns.nameservers[0]", "not an IP address"),
    ('[dns]\nnameservers = ["::1", "127.0.0.1:99999"]', "dns.nameservers[1]", "99999"),
    ('[dns]\nnameservers = ["[127.0.0.1]:53"]', "dns.nameservers[0]", "brackets"),
    ("[dns]\ntimeout = 0", "dns.timeout", "more than 0"),
    ("[dns]\nlifetime = nan", "dns.lifetime", "got nan"),
    ("[dns]\ntimeout = 301", "dns.timeout", "at most 300 and more than 0, got 301"),
    # An integer beyond every float is beyond the bound too, not an OverflowError.
    ("[dns]\ntimeout = 1" + "0" * 400, "dns.timeout", "at most 300 and more than 0, got 1000"),
    ("[dns]\nlifetime = 1e10", "dns.lifetime", "at most 300 and more than 0, got 10000000000.0"),
    ('[https]\nca_file = "/nonexistent/ca.pem"', "https.ca_file", "no such file"),
    ('[https]\nca_file = "ca.pem"', "https.ca_file", "expected an absolute path"),
    ("[https]\ntimeout = -5", "https.timeout", "more than 0"),
    ('[https]\nconnect_timeout = "5"', "https.connect_timeout", "seconds"),
    # Issue 10: accepted, it made every fetch fail with OverflowError.
    ("[https]\ntimeout = 1e10", "https.timeout", "at most 300 and more than 0, got 10000000000.0"),
    ("[https]\ntimeout = 1e300", "https.timeout", "at most 300 and more than 0, got 1e+300"),
    ("[https]\ntimeout = 300.001", "https.timeout", "at most 300"),
    ("[https]\nconnect_timeout = 1e10", "https.connect_timeout", "at most 300 and more than 0"),
    ("[https]\nallow_private_addresses = 1", "https.allow_private_addresses", "true or false"),
    ('[https]\nproxy = "socks5://127.0.0.1:1080"', "https.proxy", "http:// or https://"),
    ('[https]\nproxy = "proxy.example:3128"', "https.proxy", "http:// or https://"),
    ('[https]\nproxy = "http://proxy.example:99999"', "https.proxy", "out of range"),
    (
        '[cache]\nbackend = "mysql"',
        "cache.backend",
        'expected "sqlite", "memory", "redis" or "postgresql", got "mysql"',
    ),
    ('[cache]\nbackend = "redis"', "cache.url", "needs the server's URL"),
    ('[cache]\nbackend = "postgresql"', "cache.url", "needs the server's URL"),
    ('[cache]\nbackend = "redis"\nurl = "http://cache:6379"', "cache.url", "redis:// or rediss://"),
    ('[cache]\nbackend = "redis"\nurl = "unix://"', "cache.url", "names the socket's path"),
    ('[cache]\nbackend = "redis"\nurl = "redis:///0"', "cache.url", "no host"),
    (
        '[cache]\nbackend = "redis"\nurl = "redis://:hunter2@cache:99999/0"',
        "cache.url",
        '"redis://:***@cache:99999/0": Port out of range',
    ),
    ('[cache]\nbackend = "postgresql"\nurl = "mysql://db/x"', "cache.url", "postgresql://"),
    ('[cache]\nbackend = "postgresql"\nurl = "just words"', "cache.url", "host=... dbname=..."),
    ('[cache]\ntable = "Cache"', "cache.table", "lowercase letters, digits and '_'"),
    ('[cache]\ntable = "1cache"', "cache.table", "not starting with a digit"),
    ('[cache]\nprefix = ""', "cache.prefix", "1 to 64 printable characters"),
    ('[cache]\nprefix = "a b"', "cache.prefix", "without spaces"),
    ("[cache]\ntimeout = 0", "cache.timeout", "more than 0"),
    ("[cache]\ntimeout = 31", "cache.timeout", "at most 30"),
    ('[cache]\npath = ""', "cache.path", "expected an absolute path"),
    ('[cache]\npath = "cache.sqlite"', "cache.path", "expected an absolute path"),
    ("[cache]\ntxt_check_interval = -1", "cache.txt_check_interval", "0 or more, got -1"),
    ("[cache]\nrefresh_interval = 0", "cache.refresh_interval", "more than 0"),
    ("[cache]\nunused_after = 0", "cache.unused_after", "more than 0"),
    ("[cache]\nno_record_ttl = -0.5", "cache.no_record_ttl", "0 or more"),
    ("[cache]\nfetch_retry_interval = -300", "cache.fetch_retry_interval", "0 or more"),
    ("[cache]\nfirst_lookup_deadline = 100", "cache.first_lookup_deadline", "less than 100"),
    ("[cache]\nfirst_lookup_deadline = 0", "cache.first_lookup_deadline", "more than 0"),
    ("[cache]\nfirst_lookup_deadline = 1e300", "cache.first_lookup_deadline",
     "less than 100 and more than 0, got 1e+300"),
    # RFC 8461 §3.2: no policy lives longer than a year (max_age at most 31557600).
    ("[cache]\ntxt_check_interval = 31557601", "cache.txt_check_interval",
     "at most 31557600 and 0 or more, got 31557601"),
    ("[cache]\nrefresh_interval = 1e10", "cache.refresh_interval",
     "at most 31557600 and more than 0, got 10000000000.0"),
    ("[cache]\nno_record_ttl = 1e300", "cache.no_record_ttl", "at most 31557600 and 0 or more"),
    ("[cache]\nfetch_retry_interval = 4e7", "cache.fetch_retry_interval",
     "at most 31557600 and 0 or more, got 40000000.0"),
    ("[cache]\nunused_after = 315576001", "cache.unused_after",
     "at most 315576000 and more than 0, got 315576001"),
    ("[cache]\nunused_after = 1e300", "cache.unused_after", "at most 315576000"),
    ("[cache]\nmax_lookups = 0", "cache.max_lookups", "at most 10000 and at least 1, got 0"),
    ("[cache]\nmax_lookups = 10001", "cache.max_lookups",
     "at most 10000 and at least 1, got 10001"),
    ("[cache]\nmax_lookups = 4.0", "cache.max_lookups", "expected an integer, got 4.0"),
    ('[cache]\nmax_lookups = "100"', "cache.max_lookups", 'expected an integer, got "100"'),
    ("[cache]\nmemory_domains = 999", "cache.memory_domains",
     "at most 10000000 and at least 1000, got 999"),
    ("[cache]\nmemory_domains = 10000001", "cache.memory_domains",
     "at most 10000000 and at least 1000, got 10000001"),
    ("[cache]\nmemory_domains = true", "cache.memory_domains", "expected an integer, got true"),
    ('[policy]\ntesting = "enforce"', "policy.testing",
     'expected "notfound", "may" or "secure", got "enforce"'),
    ('[policy]\ntlsrpt = "true"', "policy.tlsrpt", "expected true or false"),
    ("maps = 1", "maps", "expected a table"),
    ("[maps]\npostfix = 1", "maps.postfix", "expected a table, got 1"),
    ('[maps.postfix]\ntesting = "none"', "maps.postfix.testing", 'got "none"'),
    ("[maps.postfix]\ntlsrpt = 0", "maps.postfix.tlsrpt", "expected true or false, got 0"),
    ('[maps."a b"]', 'maps."a b"', "without spaces"),
    ('[maps."x:y"]', 'maps."x:y"', "without spaces or ':'"),
    ('[maps.""]', 'maps.""', "non-empty"),
    ('[dane]\nenabled = "yes"', "dane.enabled", "expected true or false"),
    ('[dane]\ncheck_name = "a..b"', "dane.check_name", "expected a DNS name"),
    ('[dane]\ncheck_name = "bücher.example"', "dane.check_name", "in ASCII"),
    ('[dane]\ncheck_name = "has space.example"', "dane.check_name", "expected a DNS name"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "cause"), MISTAKES)
def test_mistakes_name_the_file_the_key_and_the_cause(text: str, key: str, cause: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads(text, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {key}: "), message
    assert cause in message


# --- files the configuration names: refused unless the daemon can use them --------------------

PEM_CERTIFICATE = CA.cert_pem.bytes()
# PEM with one base64 character changed in the middle of the certificate's body.
_BODY = PEM_CERTIFICATE.index(b"\n") + 40
BROKEN_CERTIFICATE = PEM_CERTIFICATE[:_BODY] + b"!" + PEM_CERTIFICATE[_BODY + 1 :]

# What a CA file holds, and what the message must say was found there.
CA_FILES_REFUSED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "the file is empty"),
    ("blank", b"\n  \n", "the file is empty"),
    ("text", b"These are not the certificates you are looking for.\n", "no PEM block in it"),
    ("private key", CA.private_key_pem.bytes(), "only PEM EC PRIVATE KEY, no CERTIFICATE"),
    ("DER", ssl.PEM_cert_to_DER_cert(PEM_CERTIFICATE.decode()), "binary data, not PEM text"),
    ("broken base64", BROKEN_CERTIFICATE, "its certificates cannot be loaded"),
    ("not ASCII", "# Zertifizierungsstelle für Tests\n".encode() + PEM_CERTIFICATE,
     "line 1 is not ASCII"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "content", "found"), CA_FILES_REFUSED)
def test_a_ca_file_without_a_usable_certificate_is_refused_saying_what_it_holds(
    tmp_path: Path, what: str, content: bytes, found: str
) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        loads(f'[https]\nca_file = "{path}"', SOURCE)
    message = str(caught.value)
    assert message.startswith(f'{SOURCE}: https.ca_file: "{path}": '), message
    assert found in message
    assert message.endswith("expected PEM CA certificates"), message


def test_a_ca_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        loads(f'[https]\nca_file = "{tmp_path}"', SOURCE)
    assert str(caught.value) == f'{SOURCE}: https.ca_file: "{tmp_path}": not a regular file'


@pytest.mark.parametrize(
    "content",
    [
        PEM_CERTIFICATE,
        # A bundle, with the comments and key that tools such as certifi or a combined PEM add.
        b"# Test CA\n" + PEM_CERTIFICATE + trustme.CA().cert_pem.bytes(),
        CA.private_key_pem.bytes() + PEM_CERTIFICATE,
        PEM_CERTIFICATE.replace(b"\n", b"\r\n"),
    ],
    ids=["one certificate", "bundle with comments", "key and certificate", "CRLF"],
)
def test_a_ca_file_with_certificates_is_accepted(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(content)
    assert loads(f'[https]\nca_file = "{path}"').https.ca_file == str(path)


def test_a_log_fifo_is_accepted_without_being_opened(tmp_path: Path) -> None:
    # Opening and closing the only writer of a FIFO would end its reader's input.
    fifo = tmp_path / "to-collector"
    os.mkfifo(fifo)
    assert loads(f'[log]\nfile = "{fifo}"').log.file == str(fifo)


def test_a_log_file_is_accepted_without_being_created_or_truncated(tmp_path: Path) -> None:
    # Absent in a directory where it can be created: the daemon creates it when it starts.
    absent = tmp_path / "new.log"
    assert loads(f'[log]\nfile = "{absent}"').log.file == str(absent)
    assert not absent.exists()
    existing = tmp_path / "old.log"
    existing.write_text("earlier lines\n")
    assert loads(f'[log]\nfile = "{existing}"').log.file == str(existing)
    assert existing.read_text() == "earlier lines\n"


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("missing/daemon.log", 'directory "{tmp}/missing" does not exist'),
        ("a-file/daemon.log", '"{tmp}/a-file" is not a directory'),
        ("a-directory", "is a directory"),
        ("a-socket", "is a socket"),
    ],
)
def test_a_log_file_that_cannot_be_opened_is_refused(tmp_path: Path, name: str, cause: str) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-directory").mkdir()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "a-socket"))
    path = tmp_path / name
    with pytest.raises(ConfigError) as caught:
        loads(f'[log]\nfile = "{path}"', SOURCE)
    message = str(caught.value)
    assert message.startswith(f'{SOURCE}: log.file: "{path}": '), message
    assert cause.replace("{tmp}", str(tmp_path)) in message
    assert not (tmp_path / "missing").exists()


def _loads_as_nobody(text: str) -> str:
    """What loads(text) raises, read by a process whose effective user is nobody (a child of
    this one, so that the tests keep their own identity); "" when it raises nothing."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        message = ""
        try:
            nobody = pwd.getpwnam("nobody")
            os.setegid(nobody.pw_gid)
            os.seteuid(nobody.pw_uid)
            loads(text, SOURCE)
        except ConfigError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"unexpected {exc!r}"
        os.write(writer, message.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(child, 0)
    return message


def test_a_log_file_the_reading_process_cannot_create_is_refused() -> None:
    assert os.geteuid() == 0, "reading the file as another user needs root (tests/run is run so)"
    # A directory only root may write to, read by the daemon's user: as when the daemon runs as
    # postfix-mtasts and log.file is in /var/log. /tmp, since pytest's directories are private.
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        path = os.path.join(top, "daemon.log")
        message = _loads_as_nobody(f'[log]\nfile = "{path}"')
        assert message == f'{SOURCE}: log.file: "{path}": cannot be created in "{top}"'
        with open(path, "w"):
            pass  # root's file, mode 0644 under the usual umask: nobody cannot append
        os.chmod(path, 0o644)
        message = _loads_as_nobody(f'[log]\nfile = "{path}"')
        assert message == (
            f'{SOURCE}: log.file: "{path}": cannot be opened for appending: Permission denied'
        )
        assert loads(f'[log]\nfile = "{path}"').log.file == path  # root itself may


@pytest.mark.parametrize(
    ("text", "key", "known"),
    [
        ("lisen = []", "lisen", "known top-level keys: listen, server, log"),
        ("[serve]", "serve", "known top-level keys"),
        ("[server]\nmax_conections = 1", "server.max_conections", "[server]: max_connections"),
        ("[log]\nlevels = 1", "log.levels", "[log]: level"),
        ("[dns]\nnameserver = []", "dns.nameserver", "[dns]: nameservers"),
        ("[https]\ncafile = 1", "https.cafile", "[https]: ca_file"),
        ("[cache]\nbakend = 1", "cache.bakend", "[cache]: backend"),
        ("[cache]\nmax_entries = 1", "cache.max_entries", "[cache]: backend"),
        ("[cache]\nmax_lookup = 1", "cache.max_lookup", "max_lookups, memory_domains"),
        ("[policy]\nmode = 1", "policy.mode", "[policy]: testing, tlsrpt"),
        ("[maps.postfix]\nmode = 1", "maps.postfix.mode", "[maps.postfix]: testing, tlsrpt"),
        ('[maps."x.y"]\nmode = 1', 'maps."x.y".mode', '[maps."x.y"]: testing'),
        ("[dane]\nenable = true", "dane.enable", "[dane]: enabled, check_name"),
        ("[server.tls]\nx = 1", "server.tls", "[server]"),
    ],
)
def test_unknown_keys_are_errors_at_every_level(text: str, key: str, known: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads(text, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {key}: unknown key"), message
    assert known in message


def test_maps_fall_back_to_policy_key_by_key() -> None:
    settings = loads(
        """
        [policy]
        testing = "may"
        tlsrpt = true
        [maps.postfix]
        testing = "secure"
        [maps.reporting]
        tlsrpt = false
        [maps.plain]
        """
    )
    assert settings.profile("postfix") == Profile(testing="secure", tlsrpt=True)
    assert settings.profile("reporting") == Profile(testing="may", tlsrpt=False)
    assert settings.profile("plain") == settings.policy == Profile(testing="may", tlsrpt=True)
    assert settings.profile("unknown-name") is settings.policy


def test_unknown_map_name_gets_the_built_in_default_profile() -> None:
    assert Config().profile("postfix") == Profile(testing="notfound", tlsrpt=False)


def test_load_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[cache]\nbackend = "mysql"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: cache\.backend: expected"):
        load(str(path))


def test_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('listen = ["inet:127.0.0.1:8461"]\n[cache]\nbackend = sqlite\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: TOML syntax error: ")
    assert "line 3" in message


def test_nesting_too_deep_for_the_toml_parser_is_a_config_error() -> None:
    # Arrays may span lines, so the line limit does not bound their depth.
    text = "listen = " + "[\n" * 2000 + "]\n" * 2000
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: arrays or inline tables nested too deep$"):
        loads(text, SOURCE)


@pytest.mark.parametrize(
    "line",
    [
        "listen = " + "{a = " * 2000 + "1" + "}" * 2000,
        # Python's int() refuses more than 4300 digits, which a line cannot hold any more.
        "max_connections = 1" + "0" * 5000,
        "a" + ".a" * 600 + " = 1",
    ],
    ids=["inline tables", "integer", "dotted key"],
)
def test_a_line_too_long_is_refused_before_the_toml_parser(line: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: line 2: longer than 1024 characters"):
        loads("[server]\n" + line + "\n", SOURCE)


def test_a_key_given_twice_is_a_syntax_error() -> None:
    with pytest.raises(ConfigError, match="line 3"):
        loads("[dns]\ntimeout = 1\ntimeout = 2\n", SOURCE)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[log]\nfile = '/var/log/\xe9.log'\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 2: not valid UTF-8$"):
        load(str(path))


def test_a_missing_file_given_explicitly_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read: No such file or directory$"):
        load(str(path))


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read: Is a directory$"):
        load(str(tmp_path))


def test_without_a_path_the_default_file_is_read_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "config.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", str(default))
    assert load(None) == Config()
    default.write_text('[cache]\nbackend = "memory"\n')
    assert load(None).cache.backend == "memory"
    default.write_text("[cache]\nbackend = 1\n")
    with pytest.raises(ConfigError, match=rf"^{default}: cache\.backend: "):
        load(None)


def test_default_cache_path_for_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_STATE_HOME", "/somewhere")
    assert config.default_cache_path() == "/var/lib/postfix-mtasts/cache.sqlite"


@pytest.mark.parametrize(
    ("xdg_state_home", "expected"),
    [
        ("/state", "/state/postfix-mtasts/cache.sqlite"),
        (None, "/home/u/.local/state/postfix-mtasts/cache.sqlite"),
        ("", "/home/u/.local/state/postfix-mtasts/cache.sqlite"),
        # The XDG spec says to ignore a relative path.
        ("relative", "/home/u/.local/state/postfix-mtasts/cache.sqlite"),
    ],
)
def test_default_cache_path_for_other_users(
    monkeypatch: pytest.MonkeyPatch, xdg_state_home: str | None, expected: str
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/u")
    if xdg_state_home is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", xdg_state_home)
    assert config.default_cache_path() == expected
    assert loads("").cache.path == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[cache]\nbackend = "redis"\nurl = "unix:///run/redis/redis.sock?db=2"',
            ("redis", "unix:///run/redis/redis.sock?db=2", "postfix-mtasts:", 1.0),
        ),
        (
            '[cache]\nbackend = "redis"\nurl = "rediss://u:pw@cache.example:6380/3"',
            ("redis", "rediss://u:pw@cache.example:6380/3", "postfix-mtasts:", 1.0),
        ),
        (
            '[cache]\nbackend = "postgresql"\nurl = "host=/run/postgresql dbname=mail"',
            ("postgresql", "host=/run/postgresql dbname=mail", "postfix_mtasts_cache", 1.0),
        ),
        (
            '[cache]\nbackend = "postgresql"\nurl = "postgres://u@db:5433/m"\ntable = "c_2"',
            ("postgresql", "postgres://u@db:5433/m", "c_2", 1.0),
        ),
    ],
)
def test_a_shared_store_is_named_by_its_url(text: str, expected: tuple[object, ...]) -> None:
    c = loads(text).cache
    name = c.table if c.backend == "postgresql" else c.prefix
    assert (c.backend, c.url, name, c.timeout) == expected


def test_the_dump_never_shows_a_store_password() -> None:
    for url, shown in [
        ("redis://fleet:hunter2@cache:6379/0", "redis://fleet:***@cache:6379/0"),
        (
            "postgresql://u:hunter2@db/mail?sslmode=require",
            "postgresql://u:***@db/mail?sslmode=require",
        ),
        (
            "host=/run/postgresql password=hunter2 dbname=mail",
            "host=/run/postgresql password=*** dbname=mail",
        ),
    ]:
        backend = "redis" if url.startswith("redis") else "postgresql"
        text = dump(loads(f'[cache]\nbackend = "{backend}"\nurl = "{url}"'))
        assert "hunter2" not in text
        assert f'url = "{shown}"' in text


def test_dump_of_the_defaults_reads_back_equal() -> None:
    assert loads(dump(Config())) == Config()


def test_dump_of_every_key_changed_reads_back_equal(ca_file: str, log_dir: str) -> None:
    # EVERY_KEY's snippets merged into one file: one table per header, the last value of a key.
    tables: dict[str, dict[str, str]] = {}
    for snippet, _, _ in EVERY_KEY:
        header, _, line = snippet.rpartition("\n")
        tables.setdefault(header, {})[line.split(" = ")[0]] = fill(line, ca_file, log_dir)
    text = "\n".join(header + "\n" + "\n".join(lines.values()) for header, lines in tables.items())
    settings = loads(text, SOURCE)
    assert settings.maps and settings.server.socket_mode != Config().server.socket_mode
    assert loads(dump(settings)) == settings
    assert dump(loads(dump(settings))) == dump(settings)


@given(
    path=st.text(st.characters(blacklist_characters="\0")).map(lambda s: "/" + s),
    name=st.text(alphabet=string.printable.strip().replace(":", ""), min_size=1),
    facility=st.sampled_from(["mail", "daemon", "local0", "local7", "user"]),
    testing=st.sampled_from(["notfound", "may", "secure"]),
    tlsrpt=st.booleans(),
    # Up to cache.unused_after's bound, ten years.
    seconds=st.floats(min_value=1e-6, max_value=315576000) | st.integers(1, 315576000),
    mode=st.integers(0, 0o7777),
)
def test_dump_reads_back_equal_for_any_values(
    path: str,
    name: str,
    facility: str,
    testing: config.Testing,
    tlsrpt: bool,
    seconds: float,
    mode: int,
) -> None:
    settings = Config(
        listen=("systemd", "inet:127.0.0.1:8461"),
        server=config.ServerConfig(socket_mode=mode, user=path, pid_file=path),
        # A log file is opened when the configuration is read: one that always opens.
        log=config.LogConfig(syslog_facility=facility, file=os.devnull),
        cache=config.CacheConfig(path=path, unused_after=float(seconds)),
        maps={name: Profile(testing, tlsrpt)},
    )
    assert loads(dump(settings)) == settings
