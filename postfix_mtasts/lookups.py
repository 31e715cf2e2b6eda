"""One lookup per key, shared by everyone who asks meanwhile, each asker answered in time.

Both caches (MTA-STS policies in :mod:`policydb`, DANE verdicts in :mod:`dane`) look a domain up
once however many deliveries ask for it at the same moment, and none of those deliveries may wait
longer than a deadline: the first answer within it is theirs, otherwise a fallback that says so
(for MTA-STS "no policy yet" or "try later", for DANE "try later"). The lookup itself goes on and
serves whoever asks next. Runs on the event loop; not safe to call from other threads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
A = TypeVar("A")


class SingleFlight(Generic[K, R]):
    """The lookups under way, at most one per key, each a future of ``R``."""

    def __init__(self) -> None:
        self._pending: dict[K, asyncio.Future[R]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, key: K) -> bool:
        return key in self._pending

    def jobs(self) -> list[asyncio.Future[R]]:
        """The lookups under way (a snapshot)."""
        return list(self._pending.values())

    def start(
        self,
        key: K,
        job: asyncio.Future[R],
        finished: Callable[[K, asyncio.Future[R]], None],
    ) -> asyncio.Future[R]:
        """Make ``job`` the lookup of ``key``. When it ends, ``key`` is free for a new lookup
        first, and then ``finished(key, job)`` runs (and may start one)."""
        self._pending[key] = job
        job.add_done_callback(functools.partial(self._done, key, finished))
        return job

    def _done(
        self,
        key: K,
        finished: Callable[[K, asyncio.Future[R]], None],
        job: asyncio.Future[R],
    ) -> None:
        if self._pending.get(key) is job:
            del self._pending[key]
        finished(key, job)

    def ask(
        self,
        key: K,
        start: Callable[[], asyncio.Future[R]],
        deadline: float,
        answer: Callable[[R], A],
        fallback: Callable[[K, asyncio.Future[R], Exception], A],
    ) -> asyncio.Future[A]:
        """An asker's answer: ``answer(result)`` of the lookup under way for ``key`` (``start()``
        starts one when there is none) if it ends within ``deadline`` seconds, otherwise
        ``fallback(key, job, why)``, ``why`` being the lookup's exception or ``TimeoutError``."""
        job = self._pending.get(key)
        if job is None:
            job = start()
        return asyncio.ensure_future(self._first_answer(key, job, deadline, answer, fallback))

    @staticmethod
    async def _first_answer(
        key: K,
        job: asyncio.Future[R],
        deadline: float,
        answer: Callable[[R], A],
        fallback: Callable[[K, asyncio.Future[R], Exception], A],
    ) -> A:
        try:
            # Shielded: an asker giving up does not cancel the lookup others share.
            result = await asyncio.wait_for(asyncio.shield(job), deadline)
        except Exception as exc:
            return fallback(key, job, exc)
        return answer(result)
