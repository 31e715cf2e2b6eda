"""One socketmap request answered: (map name, key) → policy domain → decision → framed reply.

The server hands each request's map name and key to `Responder.lookup` and writes what comes back
as it is: the reply framed as a netstring (bytes), or a future of it when the domain has to be
looked up first. The responder turns the key into a policy domain (`postfix.policy_domain`), asks
the DANE verdict cache when DANE is enabled (RFC 8461 §2: a validated DANE policy takes
precedence over MTA-STS), asks the policy cache (`policydb`), and turns the decision into the
reply of the map's profile (`postfix.policy_reply`), framed by `netstring.encode_reply`.

Framed replies are kept in one bounded memo per (map name, key), so that a cached answer costs no
key parsing, no reply building and no framing. The memo is the hot path's only table besides the
caches themselves.
"""

from __future__ import annotations

import asyncio
import logging

from postfix_mtasts import config, postfix
from postfix_mtasts.dane import DaneCache, DaneResult, DaneState
from postfix_mtasts.netstring import ReplyError, encode_reply, temp
from postfix_mtasts.policydb import Decision, PolicyDB

__all__ = ["MEMO_NAMES", "MEMO_SIZE", "Responder", "Unready"]

log = logging.getLogger(__name__)

# The memo holds at least this many entries, else twice the cached domains, for at most
# MEMO_NAMES map names.
MEMO_SIZE = 4096
MEMO_NAMES = 64

_NOTFOUND = encode_reply(postfix.NOTFOUND)
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
        # The memo: per map name, per key as Postfix sent it, the policy domain (the decision's
        # own string), the MTA-STS decision the reply was built from and the framed reply.
        # A new decision is a new object, so an identity check against the cache's current one
        # keeps the memo true without reading the decision (at 100000 domains each object read
        # per answer is a cache miss). A dict per map name rather than (name, key) tuples: no
        # tuple to build and hash per request, and none to keep per cached domain. Map names and
        # keys come from clients: the memo is bounded as a whole (``_memo_entries``).
        self._replies: dict[str, dict[str, tuple[str, Decision, bytes]]] = {}
        self._memo_entries = 0

    @property
    def settings(self) -> config.Config:
        return self._settings

    @settings.setter
    def settings(self, settings: config.Config) -> None:
        # Profiles may have changed: every kept reply may be wrong now.
        self._settings = settings
        self._forget_replies()

    def lookup(self, name: str, key: str) -> bytes | asyncio.Future[bytes]:
        replies = self._replies.get(name)
        memo = replies.get(key) if replies is not None else None
        if memo is not None:
            if self.dane is None:
                # The hot path: a key answered before, whose decision has not changed.
                decision = self.db.lookup(memo[0])
                if decision is memo[1]:
                    return memo[2]
                return self._mtasts_reply(name, key, memo[0], decision)
            domain = memo[0]
        else:
            found = postfix.policy_domain(key)
            if found is None:
                return _NOTFOUND
            domain = found
        if self.dane is not None:
            verdict = self.dane.lookup(domain)
            if not isinstance(verdict, DaneResult):
                return asyncio.ensure_future(self._after_dane(verdict, name, key, domain))
            reply = _dane_reply(verdict)
            if reply is not None:
                return reply
        return self._mtasts_reply(name, key, domain)

    def _mtasts_reply(
        self,
        name: str,
        key: str,
        domain: str,
        decision: Decision | asyncio.Future[Decision] | None = None,
    ) -> bytes | asyncio.Future[bytes]:
        if decision is None:
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

    # The memo ------------------------------------------------------------------------------

    def _remember(self, name: str, key: str, decision: Decision) -> bytes:
        """The framed reply for ``decision``, kept in the memo for (``name``, ``key``)."""
        if decision.defer:
            # Nothing was decided (a local shortage): Postfix asks again later, and so do we.
            return temp(f"{decision.domain}: {decision.defer}")
        replies = self._replies.get(name)
        memo = replies.get(key) if replies is not None else None
        if memo is not None and memo[1] is decision:
            # Asked again with DANE enabled (where the memo is read after the verdict).
            return memo[2]
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
        if replies is None and len(self._replies) >= MEMO_NAMES:
            # Postfix uses a name or two; a client making names up gets answers, not memory.
            return frame
        if memo is None:
            if self._memo_entries >= max(MEMO_SIZE, 2 * self.db.size):
                # More entries than the cache has domains (across every map name a client
                # made up): drop the stale ones.
                self._forget_replies()
                replies = None
            if replies is None:
                replies = self._replies[name] = {}
            self._memo_entries += 1
        assert replies is not None
        replies[key] = (decision.domain, decision, frame)
        return frame

    def _forget_replies(self) -> None:
        self._replies.clear()
        self._memo_entries = 0


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
