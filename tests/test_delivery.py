"""A full delivery through a real Postfix whose ``smtp_tls_policy_maps`` is the daemon.

A second Postfix instance of our own (configuration, queue and data directories in a temporary
directory, chroot off, its log in a file) sends mail to STARTTLS receivers on loopback port 25.
Postfix finds them the way it finds any MX: through the system resolver, which reads
``/etc/resolv.conf`` and asks port 53. So the instance runs in a mount namespace of its own where a
resolv.conf of ours is bind-mounted over ``/etc/resolv.conf``, pointing at an unbound of ours on
port 53 of a loopback address that sends ``mtasts.test`` and ``dane.test`` to the bed's knot and
answers nothing else. That unbound validates DNSSEC with the DS of the signed ``dane.test`` as its
trust anchor, and the resolv.conf says ``options trust-ad``, so a Postfix with
``smtp_dns_support_level = dnssec`` sees the AD bit (glibc drops it otherwise).
Nothing of the system's configuration is changed; every address used is on loopback.

The cases of RFC 8461 as a postmaster sees them in the mail log:

1. an ``enforce`` domain whose MX presents a valid certificate for its name is delivered over a
   verified TLS connection;
2. an ``enforce`` domain whose MX presents a certificate for another name is deferred;
3. a domain without MTA-STS is delivered as before (opportunistic TLS, no verification);

and two more that only MTA-STS explains: an MX host the policy does not list is refused even with
a valid certificate for its own name, and a ``testing`` policy (answered NOTFOUND by default)
delays nothing.

DANE (RFC 7672), with a second Postfix (``smtp_dns_support_level = dnssec``) asking the daemon that
has ``[dane] enabled``: a domain in the signed zone whose MX has a TLSA record matching the
receiver's key is answered ``dane-only`` and delivered over a connection Postfix verified by that
record alone (the certificate is from a CA Postfix does not trust); with a TLSA record for another
key, the same delivery is deferred.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
import trustme
from bed import (
    DANE_ZONE,
    WRONG_NAME,
    Bed,
    Response,
    Scenario,
    policy_text,
    tlsa_ee_digest,
    unbound_config,
)

if TYPE_CHECKING:
    from mtasts_daemon import Daemon

# The session fixtures ``daemon`` and ``dane_daemon`` (tests/mtasts_daemon.py).
pytest_plugins = ["mtasts_daemon"]


POSTFIX = "/usr/sbin/postfix"
SENDMAIL = "/usr/sbin/sendmail"
POSTSUPER = "/usr/sbin/postsuper"
UNBOUND = "/usr/sbin/unbound"
UNSHARE = "/usr/bin/unshare"
MOUNT = "/usr/bin/mount"

# How long a delivery attempt may take to show up in the mail log, and other bounded waits.
DELIVERY_TIMEOUT = 60.0
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
SMTP_IO_TIMEOUT = 20.0


def _require(*binaries: str) -> None:
    missing = [binary for binary in binaries if not os.access(binary, os.X_OK)]
    if missing:
        message = (
            f"{', '.join(missing)} not found: the delivery test needs the Debian packages "
            "postfix, unbound and util-linux (tests/run installs them)"
        )
        pytest.fail(message, pytrace=False)
    if os.geteuid() != 0:
        message = "the delivery test needs root (port 25 and 53, a mount namespace, Postfix)"
        pytest.fail(message, pytrace=False)


def _random_loopback() -> str:
    """A random 127.x.y.z other than 127.0.0.1, so concurrent test runs do not collide."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# --------------------------------------------------------------------------------------------------
# The resolver Postfix asks: unbound on port 53 of a loopback address.


def _port53_free(address: str) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((address, 53))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    return False
                raise
    return True


class Port53Resolver:
    """An unbound on ``address``:53 that knows the bed's zone."""

    def __init__(self, bed: Bed, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "unbound.log"
        self.process: subprocess.Popen[bytes] | None = None
        for _ in range(20):
            address = _random_loopback()
            if not _port53_free(address):
                continue
            config = workdir / "unbound.conf"
            config.write_text(
                unbound_config(
                    workdir,
                    53,
                    {zone: f"127.0.0.1@{bed.knot_port}" for zone in (bed.zone, DANE_ZONE)},
                    bed.dane_trust_anchors,
                    interface=address,
                    stub_zones_only=True,
                )
            )
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [UNBOUND, "-d", "-c", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.address = address
            if self._wait_until_answering(f"enforce.{bed.zone}"):
                return
            self.stop()
        pytest.fail(
            f"unbound on port 53 of a loopback address did not start; its log:\n"
            f"{_tail(self.log_path)}",
            pytrace=False,
        )

    def _wait_until_answering(self, name: str) -> bool:
        assert self.process is not None
        query = dns.message.make_query(f"_mta-sts.{name}", "TXT")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                answer = dns.query.udp(query, self.address, port=53, timeout=0.3)
            except (OSError, dns.exception.DNSException):
                time.sleep(0.05)
                continue
            return answer.rcode() == dns.rcode.NOERROR and bool(answer.answer)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------------------------------
# The receiving MX: a minimal SMTP server with STARTTLS.


@dataclass
class Message:
    """One message a receiver accepted, and how its session looked."""

    mail_from: str
    rcpt_to: list[str]
    data: bytes
    tls_version: str | None
    sni: str | None


@dataclass
class Session:
    """One connection to a receiver (delivered or not)."""

    peer: str
    starttls: bool = False
    tls_version: str | None = None
    sni: str | None = None
    error: str | None = None


class Receiver:
    """An SMTP server on ``address``:25 offering STARTTLS with ``cert``; records what it got.

    It says EHLO, STARTTLS (once), MAIL, RCPT, DATA, RSET, NOOP and QUIT; no PIPELINING, so the
    client sends one command at a time.
    """

    def __init__(self, hostname: str, cert: trustme.LeafCert) -> None:
        self.hostname = hostname
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.context.sni_callback = self._on_sni
        self.messages: list[Message] = []
        self.sessions: list[Session] = []
        self._lock = threading.Lock()
        self._sni = threading.local()
        self._stopping = threading.Event()
        self._listener = self._bind()
        self.address: str = self._listener.getsockname()[0]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _bind() -> socket.socket:
        for _ in range(50):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((_random_loopback(), 25))
            except OSError as exc:
                sock.close()
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    continue
                raise
            sock.listen(16)
            sock.settimeout(0.2)
            return sock
        raise OSError("no free loopback address for an SMTP receiver on port 25")

    def _on_sni(self, sock: Any, server_name: str | None, _: Any) -> None:
        self._sni.name = server_name

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer[0]), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        session = Session(peer)
        with self._lock:
            self.sessions.append(session)
        try:
            self._dialogue(conn, session)
        except (OSError, ssl.SSLError, UnicodeError) as exc:
            session.error = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _dialogue(self, conn: socket.socket, session: Session) -> None:
        conn.settimeout(SMTP_IO_TIMEOUT)
        reader = conn.makefile("rb")

        def send(*lines: str) -> None:
            conn.sendall("".join(f"{line}\r\n" for line in lines).encode("ascii"))

        send(f"220 {self.hostname} ESMTP test receiver")
        mail_from: str | None = None
        rcpt_to: list[str] = []
        while True:
            raw = reader.readline(4096)
            if not raw:
                return
            line = raw.decode("utf-8").rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                extensions = [] if session.starttls else ["STARTTLS"]
                replies = [self.hostname, *extensions, "8BITMIME"]
                send(*(f"250-{r}" for r in replies[:-1]), f"250 {replies[-1]}")
            elif verb == "HELO":
                send(f"250 {self.hostname}")
            elif verb == "STARTTLS" and not session.starttls:
                send("220 2.0.0 Ready to start TLS")
                self._sni.name = None
                tls = self.context.wrap_socket(conn, server_side=True)
                conn = tls
                session.starttls = True
                session.tls_version = tls.version()
                session.sni = self._sni.name
                reader = conn.makefile("rb")
                mail_from, rcpt_to = None, []
            elif verb == "MAIL":
                mail_from = line.split(":", 1)[1].strip() if ":" in line else ""
                rcpt_to = []
                send("250 2.1.0 Ok")
            elif verb == "RCPT" and mail_from is not None:
                rcpt_to.append(line.split(":", 1)[1].strip() if ":" in line else "")
                send("250 2.1.5 Ok")
            elif verb == "DATA" and rcpt_to:
                send("354 End data with <CR><LF>.<CR><LF>")
                data = b""
                while True:
                    chunk = reader.readline(65536)
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                assert mail_from is not None
                with self._lock:
                    self.messages.append(
                        Message(mail_from, rcpt_to, data, session.tls_version, session.sni)
                    )
                send("250 2.0.0 Ok: queued")
                mail_from, rcpt_to = None, []
            elif verb == "RSET":
                mail_from, rcpt_to = None, []
                send("250 2.0.0 Ok")
            elif verb == "NOOP":
                send("250 2.0.0 Ok")
            elif verb == "QUIT":
                send("221 2.0.0 Bye")
                return
            else:
                send("502 5.5.2 Error: command not recognized")

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        self._thread.join(STOP_TIMEOUT)


# --------------------------------------------------------------------------------------------------
# The delivering Postfix.

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _main_cf(root: Path, policy_table: str, ca_file: Path, extra: str = "") -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
myhostname = sender.mtasts.test
mydomain = mtasts.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
alias_maps =
alias_database =
notify_classes =
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
# What the daemon is for:
smtp_tls_security_level = may
smtp_tls_policy_maps = {policy_table}
smtp_tls_CAfile = {ca_file}
smtp_tls_loglevel = 1
# Bounded waits, should a receiver misbehave.
smtp_connect_timeout = 10s
smtp_helo_timeout = {SMTP_IO_TIMEOUT:.0f}s
smtp_starttls_timeout = {SMTP_IO_TIMEOUT:.0f}s
smtp_mail_timeout = {SMTP_IO_TIMEOUT:.0f}s
smtp_rcpt_timeout = {SMTP_IO_TIMEOUT:.0f}s
smtp_data_init_timeout = {SMTP_IO_TIMEOUT:.0f}s
smtp_data_xfer_timeout = {SMTP_IO_TIMEOUT:.0f}s
smtp_data_done_timeout = {SMTP_IO_TIMEOUT:.0f}s
{extra}"""


@dataclass
class Delivery:
    """The mail log lines of one recipient's delivery attempt."""

    status: str
    line: str
    log: str


@dataclass
class PostfixInstance:
    """A Postfix of our own in ``root`` (world-traversable: Postfix's daemons run as postfix)."""

    root: Path
    resolver_address: str
    policy_table: str
    ca_file: str
    # More main.cf settings (the DANE sender's DNSSEC level).
    extra_main_cf: str = ""
    master_pid: int = 0
    sent: list[str] = field(default_factory=list)

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def log(self) -> str:
        return _tail(self.maillog, 60)

    def start(self) -> None:
        conf = self.config_dir
        conf.mkdir()
        (self.root / "queue").mkdir()
        data = self.root / "data"
        data.mkdir()
        shutil.chown(data, user="postfix")
        ca_copy = self.root / "ca.pem"
        shutil.copyfile(self.ca_file, ca_copy)
        ca_copy.chmod(0o644)
        (conf / "main.cf").write_text(
            _main_cf(self.root, self.policy_table, ca_copy, self.extra_main_cf)
        )
        (conf / "master.cf").write_text(MASTER_CF)
        resolv_conf = self.root / "resolv.conf"
        resolv_conf.write_text(
            # trust-ad: glibc passes the resolver's AD bit on to Postfix (glibc 2.31 and newer).
            f"nameserver {self.resolver_address}\noptions timeout:2 attempts:2 trust-ad\n"
        )
        resolv_conf.chmod(0o644)
        # Postfix's master and every daemon it starts stay in this mount namespace, where
        # /etc/resolv.conf is ours; the rest of the machine does not see the bind mount.
        script = 'mount --bind "$1" /etc/resolv.conf && exec "$2" -c "$3" start'
        started = subprocess.run(
            [
                *(UNSHARE, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script),
                *("sh", str(resolv_conf), POSTFIX, str(conf)),
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT * 2,
            check=False,
        )
        if started.returncode != 0:
            pytest.fail(
                f"postfix -c {conf} start (in a mount namespace) failed with status "
                f"{started.returncode}:\n{started.stdout}{started.stderr}\nmail log:\n{self.log()}",
                pytrace=False,
            )
        self.master_pid = self._wait_for_master()
        # The namespace really is in place: master sees our resolv.conf.
        seen = Path(f"/proc/{self.master_pid}/root/etc/resolv.conf").read_text()
        assert seen == resolv_conf.read_text(), f"Postfix's master sees resolv.conf:\n{seen}"

    def _wait_for_master(self) -> int:
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().split()[0])
                if _alive(pid) and "daemon started" in self.maillog.read_text(errors="replace"):
                    return pid
            time.sleep(0.1)
        pytest.fail(f"Postfix's master did not start; mail log:\n{self.log()}", pytrace=False)

    def postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def clear_queue(self) -> None:
        result = subprocess.run(
            [POSTSUPER, "-c", str(self.config_dir), "-d", "ALL"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"postsuper -d ALL: {result.stderr}"

    def send(self, recipient: str, subject: str) -> None:
        """Inject a message with sendmail (postdrop; pickup hands it to the queue manager)."""
        message = (
            f"From: test sender <postmaster@sender.mtasts.test>\n"
            f"To: <{recipient}>\n"
            f"Subject: {subject}\n"
            f"\n"
            f"A message from the postfix-mtasts delivery test.\n"
        )
        result = subprocess.run(
            [SENDMAIL, "-C", str(self.config_dir), "-f", "<>", "-i", "--", recipient],
            input=message,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"sendmail: {result.stdout}{result.stderr}"
        self.sent.append(recipient)

    def wait_for_delivery(self, recipient: str) -> Delivery:
        """The first ``status=`` line for the recipient in the mail log (bounded wait)."""
        pattern = re.compile(rf"to=<{re.escape(recipient)}>.*\bstatus=(\w+)")
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline:
            log = self.maillog.read_text(errors="replace")
            for line in log.splitlines():
                found = pattern.search(line)
                if found:
                    return Delivery(found.group(1), line, log)
            time.sleep(0.2)
        pytest.fail(
            f"no delivery status for {recipient} within {DELIVERY_TIMEOUT:.0f}s; mail log:\n"
            f"{self.log()}",
            pytrace=False,
        )

    def stop(self) -> None:
        if not self.master_pid:
            return
        self.postfix("stop")
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(self.master_pid):
            self.postfix("abort")
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.master_pid, 9)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def port53(bed: Bed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Port53Resolver]:
    """The resolver of the delivering Postfixes, on port 53 of a loopback address."""
    _require(POSTFIX, SENDMAIL, POSTSUPER, UNBOUND, UNSHARE, MOUNT)
    resolver = Port53Resolver(bed, tmp_path_factory.mktemp("port53"))
    try:
        yield resolver
    finally:
        resolver.stop()


@contextlib.contextmanager
def postfix_instance(
    bed: Bed, resolver: Port53Resolver, policy_table: str, extra_main_cf: str = ""
) -> Iterator[PostfixInstance]:
    # Not under pytest's basetemp: that is mode 0700, and Postfix's daemons run as postfix.
    root = Path(tempfile.mkdtemp(prefix="postfix-mtasts-delivery-"))
    root.chmod(0o755)
    instance = PostfixInstance(root, resolver.address, policy_table, bed.ca_file, extra_main_cf)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sender(bed: Bed, daemon: Daemon, port53: Port53Resolver) -> Iterator[PostfixInstance]:
    """The delivering Postfix, its resolver in place, asking the daemon over ``inet:``."""
    with postfix_instance(bed, port53, daemon.table("postfix")) as instance:
        yield instance


# RFC 7672 needs validated DNS: Postfix asks with the DO bit and trusts the resolver's AD bit. Its
# start-up probe of whether the resolver validates asks for a name the bed signed.
DANE_MAIN_CF = f"""\
smtp_dns_support_level = dnssec
dnssec_probe = ns:{DANE_ZONE}
"""


@pytest.fixture(scope="module")
def dane_sender(bed: Bed, dane_daemon: Daemon, port53: Port53Resolver) -> Iterator[PostfixInstance]:
    """A delivering Postfix for DANE: DNSSEC lookups, asking the daemon with ``[dane] enabled``."""
    secure = dns.message.make_query(DANE_ZONE, "SOA", want_dnssec=True)
    answer = dns.query.udp(secure, port53.address, port=53, timeout=3)
    assert answer.flags & dns.flags.AD, f"the port 53 resolver does not validate:\n{answer}"
    with postfix_instance(bed, port53, dane_daemon.table("postfix"), DANE_MAIN_CF) as instance:
        yield instance


@pytest.fixture
def postfix(sender: PostfixInstance) -> Iterator[PostfixInstance]:
    """The delivering Postfix with an empty queue, emptied again afterwards."""
    sender.clear_queue()
    yield sender
    sender.clear_queue()


@pytest.fixture
def dane_postfix(dane_sender: PostfixInstance) -> Iterator[PostfixInstance]:
    """The DANE-delivering Postfix with an empty queue, emptied again afterwards."""
    dane_sender.clear_queue()
    yield dane_sender
    dane_sender.clear_queue()


@contextlib.contextmanager
def receiver(hostname: str, cert: trustme.LeafCert) -> Iterator[Receiver]:
    running = Receiver(hostname, cert)
    try:
        yield running
    finally:
        running.stop()


def publish_mx(bed: Bed, domain: str, mx_host: str, address: str) -> None:
    bed.dns_set(domain, "MX", [f"10 {mx_host}."])
    bed.dns_set(mx_host, "A", [address])


def publish_policy(bed: Bed, domain: str, mode: str, mx: tuple[str, ...]) -> None:
    bed.add_domain(
        domain,
        Scenario(
            txt=(f"v=STSv1; id={mode}{random.randint(1, 10**9)};",),
            response=Response(body=policy_text(mode, mx)),
        ),
    )


# --------------------------------------------------------------------------------------------------
# The cases.


def test_enforce_domain_with_valid_mx_certificate_is_delivered_verified(
    bed: Bed, daemon: Daemon, postfix: PostfixInstance
) -> None:
    domain = bed.unique_domain("deliver")
    mx_host = f"mail.{domain}"
    publish_policy(bed, domain, "enforce", (mx_host,))
    # Postfix's own lookup is the daemon's first for this domain.
    with receiver(mx_host, bed.ca.issue_cert(mx_host)) as mx:
        publish_mx(bed, domain, mx_host, mx.address)
        recipient = f"user@{domain}"
        postfix.send(recipient, "enforce, valid certificate")
        delivery = postfix.wait_for_delivery(recipient)
        context = f"mail log:\n{postfix.log()}\ndaemon log:\n{daemon.log()}"
        assert delivery.status == "sent", context
        assert f"relay={mx_host}[{mx.address}]:25" in delivery.line, context
        assert f"Verified TLS connection established to {mx_host}[{mx.address}]:25" in (
            delivery.log
        ), context
        assert [m.rcpt_to for m in mx.messages] == [[f"<{recipient}>"]], mx.sessions
        # servername=hostname: Postfix sent the MX name as SNI.
        assert mx.messages[0].tls_version is not None
        assert mx.messages[0].sni == mx_host
    assert daemon.request(domain) == f"OK secure match={mx_host} servername=hostname"


def test_enforce_domain_with_wrong_mx_certificate_is_deferred(
    bed: Bed, daemon: Daemon, postfix: PostfixInstance
) -> None:
    domain = bed.unique_domain("wrongcert")
    mx_host = f"mail.{domain}"
    publish_policy(bed, domain, "enforce", (mx_host,))
    with receiver(mx_host, bed.ca.issue_cert(WRONG_NAME)) as mx:
        publish_mx(bed, domain, mx_host, mx.address)
        recipient = f"user@{domain}"
        postfix.send(recipient, "enforce, certificate for another name")
        delivery = postfix.wait_for_delivery(recipient)
        context = f"mail log:\n{postfix.log()}\ndaemon log:\n{daemon.log()}"
        assert delivery.status == "deferred", context
        assert "dsn=4.7.5, status=deferred (Server certificate not verified)" in delivery.line
        assert (
            f"server certificate verification failed for {mx_host}[{mx.address}]:25" in delivery.log
        ), context
        assert f"Verified TLS connection established to {mx_host}" not in delivery.log, context
        assert mx.messages == [], mx.messages
        # It did reach the receiver and start TLS: the refusal is Postfix's certificate check.
        assert any(s.starttls for s in mx.sessions), mx.sessions
    assert daemon.request(domain) == f"OK secure match={mx_host} servername=hostname"


def test_domain_without_mta_sts_is_delivered_as_before(
    bed: Bed, daemon: Daemon, postfix: PostfixInstance
) -> None:
    domain = bed.unique_domain("nosts")
    mx_host = f"mail.{domain}"
    # A certificate for another name: without MTA-STS nothing is verified, so it is delivered.
    with receiver(mx_host, bed.ca.issue_cert(WRONG_NAME)) as mx:
        publish_mx(bed, domain, mx_host, mx.address)
        recipient = f"user@{domain}"
        postfix.send(recipient, "no MTA-STS")
        delivery = postfix.wait_for_delivery(recipient)
        context = f"mail log:\n{postfix.log()}\ndaemon log:\n{daemon.log()}"
        assert delivery.status == "sent", context
        assert f"relay={mx_host}[{mx.address}]:25" in delivery.line, context
        # Opportunistic TLS (smtp_tls_security_level = may), as without the daemon.
        assert f"TLS connection established to {mx_host}[{mx.address}]:25" in delivery.log
        assert f"Verified TLS connection established to {mx_host}" not in delivery.log
        assert [m.rcpt_to for m in mx.messages] == [[f"<{recipient}>"]], mx.sessions
        assert mx.messages[0].tls_version is not None
        assert mx.messages[0].sni is None
    assert daemon.request(domain) == "NOTFOUND "


def test_enforce_domain_whose_mx_is_not_in_the_policy_is_deferred(
    bed: Bed, daemon: Daemon, postfix: PostfixInstance
) -> None:
    """RFC 8461 §4.1: the MX must match a policy ``mx`` pattern; a valid certificate for an MX
    host the policy does not list is not enough."""
    domain = bed.unique_domain("othermx")
    listed = f"mail.{domain}"
    mx_host = f"rogue.{domain}"
    publish_policy(bed, domain, "enforce", (listed,))
    with receiver(mx_host, bed.ca.issue_cert(mx_host)) as mx:
        publish_mx(bed, domain, mx_host, mx.address)
        recipient = f"user@{domain}"
        postfix.send(recipient, "enforce, MX not in the policy")
        delivery = postfix.wait_for_delivery(recipient)
        context = f"mail log:\n{postfix.log()}\ndaemon log:\n{daemon.log()}"
        assert delivery.status == "deferred", context
        assert "dsn=4.7.5, status=deferred (Server certificate not verified)" in delivery.line
        assert mx.messages == [], mx.messages
    assert daemon.request(domain) == f"OK secure match={listed} servername=hostname"


def test_testing_domain_with_wrong_certificate_is_delivered(
    bed: Bed, daemon: Daemon, postfix: PostfixInstance
) -> None:
    """RFC 8461 §5: a ``testing`` policy is only reported on, never enforced (default profile)."""
    domain = bed.unique_domain("testingmode")
    mx_host = f"mail.{domain}"
    publish_policy(bed, domain, "testing", (mx_host,))
    with receiver(mx_host, bed.ca.issue_cert(WRONG_NAME)) as mx:
        publish_mx(bed, domain, mx_host, mx.address)
        recipient = f"user@{domain}"
        postfix.send(recipient, "testing, certificate for another name")
        delivery = postfix.wait_for_delivery(recipient)
        context = f"mail log:\n{postfix.log()}\ndaemon log:\n{daemon.log()}"
        assert delivery.status == "sent", context
        assert f"Verified TLS connection established to {mx_host}" not in delivery.log
        assert [m.rcpt_to for m in mx.messages] == [[f"<{recipient}>"]], mx.sessions
    assert daemon.request(domain) == "NOTFOUND "
    assert daemon.request(domain, "strict") == f"OK secure match={mx_host} servername=hostname"


# --------------------------------------------------------------------------------------------------
# DANE (RFC 7672).


def publish_dane_mx(bed: Bed, domain: str, mx_host: str, address: str, tlsa_digest: str) -> None:
    """MX, address and a DANE-EE TLSA record (3 1 1: SHA-256 of the key) in the signed zone."""
    bed.dns_set(domain, "MX", [f"10 {mx_host}."])
    bed.dns_set(mx_host, "A", [address])
    bed.dns_set(f"_25._tcp.{mx_host}", "TLSA", [f"3 1 1 {tlsa_digest}"])


def test_dane_only_domain_with_matching_tlsa_is_delivered_verified(
    bed: Bed, dane_daemon: Daemon, dane_postfix: PostfixInstance
) -> None:
    domain = bed.unique_dane_domain("daneok")
    mx_host = f"mail.{domain}"
    # A certificate Postfix cannot verify by its CA file: only the TLSA record vouches for it.
    cert = trustme.CA(organization_name="not trusted by Postfix").issue_cert(mx_host)
    with receiver(mx_host, cert) as mx:
        publish_dane_mx(bed, domain, mx_host, mx.address, tlsa_ee_digest(cert))
        recipient = f"user@{domain}"
        dane_postfix.send(recipient, "dane-only, matching TLSA")
        delivery = dane_postfix.wait_for_delivery(recipient)
        context = f"mail log:\n{dane_postfix.log()}\ndaemon log:\n{dane_daemon.log()}"
        assert delivery.status == "sent", context
        assert f"relay={mx_host}[{mx.address}]:25" in delivery.line, context
        assert f"Verified TLS connection established to {mx_host}[{mx.address}]:25" in (
            delivery.log
        ), context
        # Postfix saw the AD bit: its probe of the resolver found DNSSEC validation.
        assert "DNSSEC validation may be unavailable" not in delivery.log, context
        assert [m.rcpt_to for m in mx.messages] == [[f"<{recipient}>"]], mx.sessions
        assert mx.messages[0].tls_version is not None
    assert dane_daemon.request(domain) == "OK dane-only"


def test_dane_only_domain_with_tlsa_for_another_key_is_deferred(
    bed: Bed, dane_daemon: Daemon, dane_postfix: PostfixInstance
) -> None:
    domain = bed.unique_dane_domain("danebad")
    mx_host = f"mail.{domain}"
    # A certificate from the CA Postfix trusts, for the right name: only DANE can refuse it.
    cert = bed.ca.issue_cert(mx_host)
    other_key = tlsa_ee_digest(bed.ca.issue_cert(mx_host))
    with receiver(mx_host, cert) as mx:
        publish_dane_mx(bed, domain, mx_host, mx.address, other_key)
        recipient = f"user@{domain}"
        dane_postfix.send(recipient, "dane-only, TLSA for another key")
        delivery = dane_postfix.wait_for_delivery(recipient)
        context = f"mail log:\n{dane_postfix.log()}\ndaemon log:\n{dane_daemon.log()}"
        assert delivery.status == "deferred", context
        assert "dsn=4.7.5, status=deferred (Server certificate not verified)" in delivery.line
        assert (
            f"server certificate verification failed for {mx_host}[{mx.address}]:25: "
            "num=65:no matching DANE TLSA records"
        ) in delivery.log, context
        assert f"Verified TLS connection established to {mx_host}" not in delivery.log, context
        assert mx.messages == [], mx.messages
        # It reached the receiver and started TLS: the refusal is Postfix's DANE check.
        assert any(s.starttls for s in mx.sessions), mx.sessions
    assert dane_daemon.request(domain) == "OK dane-only"
