"""One socketmap request answered: (map name, key) → policy domain → decision → framed reply.

The server hands each request's map name and key to `Responder.lookup` and writes what comes back
as it is: the reply framed as a netstring (bytes), or a future of it when the domain has to be
looked up first. The responder turns the key into a policy domain (`postfix.policy_domain`), asks
the DANE verdict cache when DANE is enabled (RFC 8461 §2: a validated DANE policy takes
precedence over MTA-STS), asks the policy cache (`policydb`), and turns the decision into the
reply of the map's profile (`postfix.policy_reply`), framed by `netstring.encode_reply`.

The framed reply is kept by the policy cache, per domain and map name (`PolicyDB.remember`), in
place of the decision it was built from: a cached answer then costs no key parsing, no reply
building and no framing (`PolicyDB.recall`), and a cached domain holds little more in memory than
its replies and a few timestamps.

Each answer is counted, by map name and kind (``Responder.answers``, read by the metrics
exporter when scraped): on the hot path one integer increment, the kind told by identity since
the replies that are the same for every domain (``NOTFOUND``, ``OK may``) are kept as one shared
object each.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from postfix_mtasts import config, postfix
from postfix_mtasts.dane import DaneCache, DaneResult, DaneState
from postfix_mtasts.netstring import ReplyError, encode_reply, temp
from postfix_mtasts.policydb import Decision, PolicyDB

__all__ = ["ANSWER_KINDS", "MAP_NAMES", "OTHER_MAPS", "Responder", "Unready", "answer_kind"]

log = logging.getLogger(__name__)

# Map names whose replies the cache keeps (db.remember); those of other names are built anew.
MAP_NAMES = 64

# What an answer said, as counted per map name (Responder.answers): each kind's index is its slot.
ANSWER_KINDS = ("secure", "dane-only", "dane", "notfound", "temp", "perm", "other")
_SECURE, _DANE_ONLY, _DANE, _NOTFOUND_KIND, _TEMP, _PERM, _OTHER = range(len(ANSWER_KINDS))
# The prefixes of the reply payloads by kind, longest first ("OK dane-only" before "OK dane").
_KIND_PREFIXES = (
    (b"OK secure", _SECURE),
    (b"OK dane-only", _DANE_ONLY),
    (b"OK dane", _DANE),
    (b"NOTFOUND", _NOTFOUND_KIND),
    (b"TEMP", _TEMP),
    (b"PERM", _PERM),
)
# The map name under which the answers for names beyond the first MAP_NAMES are counted.
OTHER_MAPS = "(others)"

_NOTFOUND = encode_reply(postfix.NOTFOUND)
# The kept replies that are the same for every domain are these very objects: the hot path tells
# them from a "secure" reply by identity (and a cached domain holds no copy of its own).
_MAY = encode_reply("OK may")
_SHARED_REPLIES = {_NOTFOUND: _NOTFOUND, _MAY: _MAY}
# The replies to DANE verdicts that name no domain (all but TEMP), framed once.
_DANE_REPLIES: dict[DaneState, bytes] = {
    state: encode_reply(payload)
    for state in DaneState
    if state is not DaneState.TEMP
    and (payload := postfix.dane_reply(DaneResult("", state))) is not None
}


class Responder:
    """Answers one socketmap request with its framed reply, at once or as a future.

    With DANE enabled, a validated DANE verdict takes precedence over MTA-STS (RFC 8461 §2);
    for a domain seen for the first time both lookups run at once.
    """

    def __init__(
        self, settings: config.Config, db: PolicyDB, dane_cache: DaneCache | None = None
    ) -> None:
        self._settings = settings
        self.db = db
        self.dane = dane_cache
        # One string per map name, for the replies the cache keeps per name (db.remember):
        # names come from clients, so at most MAP_NAMES of them.
        self._names: dict[str, str] = {}
        # Answers given, per map name (the first MAP_NAMES, then OTHER_MAPS) and kind (the slots
        # of ANSWER_KINDS): plain integers, read by the metrics exporter when it is scraped. A
        # name whose replies are kept (in _names) has its counts here.
        self.answers: dict[str, list[int]] = {OTHER_MAPS: [0] * len(ANSWER_KINDS)}

    @property
    def settings(self) -> config.Config:
        return self._settings

    @settings.setter
    def settings(self, settings: config.Config) -> None:
        # Profiles may have changed: every kept reply may be wrong now.
        self._settings = settings
        self.db.forget_replies()

    def lookup(self, name: str, key: str) -> bytes | asyncio.Future[bytes]:
        if self.dane is None:
            # The hot path: a key that is a cached policy domain, its reply kept for this name.
            reply = self.db.recall(name, key)
            if reply is not None:
                # A kept reply is one of the shared ones or a "secure" one (_remember).
                counts = self.answers[name]
                if reply is _NOTFOUND:
                    counts[_NOTFOUND_KIND] += 1
                elif reply is _MAY:
                    counts[_OTHER] += 1
                else:
                    counts[_SECURE] += 1
                return reply
        answer = self._answer(name, key)
        if isinstance(answer, bytes):
            self._count(name, answer)
        else:
            answer.add_done_callback(functools.partial(self._count_later, name))
        return answer

    def _answer(self, name: str, key: str) -> bytes | asyncio.Future[bytes]:
        domain = postfix.policy_domain(key)
        if domain is None:
            return _NOTFOUND
        if self.dane is not None:
            verdict = self.dane.lookup(domain)
            if not isinstance(verdict, DaneResult):
                return asyncio.ensure_future(self._after_dane(verdict, name, key, domain))
            dane_reply = _dane_reply(verdict)
            if dane_reply is not None:
                return dane_reply
        if domain is not key or self.dane is not None:
            # A key written otherwise (case, a port) whose domain is cached, or DANE's turn
            # passed to MTA-STS.
            reply = self.db.recall(name, domain)
            if reply is not None:
                return reply
        return self._mtasts_reply(name, key, domain)

    def _count(self, name: str, frame: bytes) -> None:
        """Count an answer given other than from the hot path."""
        kept = self._names.get(name) or self._register(name)
        counts = self.answers[kept if kept is not None else OTHER_MAPS]
        counts[answer_kind(frame)] += 1

    def _register(self, name: str) -> str | None:
        """Take ``name`` among the map names whose replies are kept and answers counted (one
        string per name, the first MAP_NAMES only: names come from clients)."""
        if len(self._names) >= MAP_NAMES:
            return None
        self.answers.setdefault(name, [0] * len(ANSWER_KINDS))
        self._names[name] = name
        return name

    def _count_later(self, name: str, answer: asyncio.Future[bytes]) -> None:
        # A lookup the server gave up on (cancelled) or that failed is answered TEMP by the
        # server, which counts it itself.
        if not answer.cancelled() and answer.exception() is None:
            self._count(name, answer.result())

    def _mtasts_reply(self, name: str, key: str, domain: str) -> bytes | asyncio.Future[bytes]:
        decision = self.db.lookup(domain)
        if not isinstance(decision, Decision):
            return asyncio.ensure_future(self._later(decision, name, key))
        return self._remember(name, key, decision)

    async def _after_dane(
        self, pending: asyncio.Future[DaneResult], name: str, key: str, domain: str
    ) -> bytes:
        # Start the MTA-STS lookup too, so that a domain without DANE waits for one round only.
        mtasts_reply = self._mtasts_reply(name, key, domain)
        reply = _dane_reply(await pending)
        if reply is not None:
            return reply
        if isinstance(mtasts_reply, bytes):
            return mtasts_reply
        return await mtasts_reply

    async def _later(self, pending: asyncio.Future[Decision], name: str, key: str) -> bytes:
        return self._remember(name, key, await pending)

    def _remember(self, name: str, key: str, decision: Decision) -> bytes:
        """The framed reply for ``decision``, kept by the cache for (``name``, its domain)."""
        if decision.defer:
            # Nothing was decided (a local shortage): Postfix asks again later, and so do we.
            return encode_reply(postfix.temp(f"{decision.domain}: {decision.defer}"))
        payload = postfix.policy_reply(
            decision.policy, self._settings.profile(name), decision.domain, decision.policy_text
        )
        try:
            frame = encode_reply(payload)
        except ReplyError as exc:
            # A reply Postfix must not see (over its size limit): not kept, so that each request
            # is refused, and logged, again.
            log.error("%s: invalid reply from the responder (map %s): %s", _key(key), name, exc)
            return temp("internal error")
        frame = _SHARED_REPLIES.get(frame, frame)
        kept = self._names.get(name) or self._register(name)
        if kept is not None:
            # Postfix uses a name or two; a client making names up gets answers, not memory.
            self.db.remember(decision, kept, frame)
        return frame


def answer_kind(frame: bytes) -> int:
    """The slot in ANSWER_KINDS of a framed reply (``LENGTH:PAYLOAD,``)."""
    start = frame.find(b":") + 1
    for prefix, kind in _KIND_PREFIXES:
        if frame.startswith(prefix, start):
            return kind
    return _OTHER


def _dane_reply(verdict: DaneResult) -> bytes | None:
    """The framed reply for a DANE verdict; ``None`` when DANE does not apply (MTA-STS decides)."""
    reply = _DANE_REPLIES.get(verdict.state)
    if reply is not None or verdict.state is not DaneState.TEMP:
        return reply
    # TEMP names the domain and the reason.
    payload = postfix.dane_reply(verdict)
    return None if payload is None else encode_reply(payload)


def _key(key: str) -> str:
    # Keys come from the network; repr() keeps odd ones on one readable log line.
    return key if key.isprintable() and len(key) <= 300 else repr(key[:300])


class Unready:
    """The responder until the cache is open (the server is not started before that)."""

    def lookup(self, name: str, key: str) -> bytes:
        return temp("starting")
