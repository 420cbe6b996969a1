"""Quotas: requests per key (or per client address when keys are off) with the `limits`
library's moving window, on Redis shared by every API process or in this process's memory;
and caps on the long requests (open streams, running exports) each key may hold at once.

Over a quota the answer is 429 with an exact `Retry-After`: a moving window remembers when
each request was counted, so the time the oldest one leaves the window is known.
"""

import asyncio
import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs

import structlog
from limits import RateLimitItem
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

# Re-exported: the `keys` command checks a key's own limit with it.
from crypto_client.setting_values import parse_rate_limit as parse_rate_limit

log = structlog.get_logger(__name__)

# What a request costs against its quota: reading a whole history once costs as much as ten
# ordinary requests.
EXPENSIVE_COST = 10
_EXPENSIVE_PATHS = frozenset({"/prices/export", "/prices/resample"})
STREAM_PATHS = frozenset({"/prices/stream"})
EXPORT_PATHS = frozenset({"/prices/export"})


def request_cost(path: str, query_string: bytes) -> int:
    if path in _EXPENSIVE_PATHS:
        return EXPENSIVE_COST
    if path == "/prices/candles" and "from_ts" not in parse_qs(query_string.decode("latin-1")):
        return EXPENSIVE_COST  # from the first row on: a whole history
    return 1


# A store round trip per request would cost more than the request (bench/exposure.py): a
# limit of N per window is taken from the store N / RESERVE_DIVISOR permits at a time, and the
# process spends them locally. The next chunk is fetched in the background when half of one is
# spent, so under steady load no request waits for the store. Limits below RESERVE_DIVISOR * 2
# stay exact, one trip each; above, a key may get up to 2 % per process fewer than its limit in
# a window (a chunk in use and the next one), never more.
RESERVE_DIVISOR = 100
_RESERVATIONS = 10_000
_STORAGE_WARNING_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    policy: str  # the draft RateLimit-Policy header: "100;w=1, 10000;w=3600"
    limit: int = 0
    retry_after: int = 0


@dataclass(frozen=True, slots=True)
class _Limit:
    """One limit of a policy, with what each request needs of it worked out once."""

    item: RateLimitItem
    key: str  # item.key_for(): the slot of this limit's permits held here
    chunk: int  # permits taken from the store at a time (1: exact)


class _Policy:
    def __init__(self, items: tuple[RateLimitItem, ...]) -> None:
        self.limits = tuple(_Limit(item, item.key_for(), item.amount // RESERVE_DIVISOR) for item in items)
        header = ", ".join(f"{item.amount};w={item.get_expiry()}" for item in items)
        self.allowed = Verdict(True, header, items[0].amount)  # the same answer every time


class _Reserve:
    """Permits of one limit for one identity, counted in the store ahead of use: the batch in
    use and the one fetched next, each usable only while its permits are still in the window."""

    __slots__ = ("left", "next_left", "next_until", "refill", "until")

    def __init__(self) -> None:
        self.left = self.next_left = 0
        self.until = self.next_until = 0.0
        self.refill: asyncio.Task[bool] | None = None

    def take(self, cost: int, now: float) -> bool:
        if self.left < cost or self.until <= now:
            if self.next_left < cost or self.next_until <= now:
                return False
            self.left, self.until, self.next_left = self.next_left, self.next_until, 0
        self.left -= cost
        return True

    def add(self, permits: int, until: float) -> None:
        if self.left == 0 or self.until <= time.monotonic():
            self.left, self.until = permits, until
        else:
            self.next_left, self.next_until = permits, until

    def runs_low(self, chunk: int) -> bool:
        return self.refill is None and self.next_left == 0 and self.left * 2 < chunk


class Quotas:
    """Charges requests to identities ("key:NAME" or "address:IP") against their limits."""

    def __init__(self, storage_url: str, default_limit: str | None) -> None:
        options = {"implementation": "redispy"} if storage_url.startswith(("redis", "rediss")) else {}
        self._storage = storage_from_string(f"async+{storage_url}", wrap_exceptions=True, **options)
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._default = _Policy(parse_rate_limit(default_limit)) if default_limit else None
        self._policies: dict[str, _Policy] = {}
        self._storage_failed_at = -_STORAGE_WARNING_SECONDS
        self._reserves: dict[tuple[str, str], _Reserve] = {}

    def _policy_for(self, own_limit: str | None) -> _Policy | None:
        if own_limit is None:
            return self._default
        policy = self._policies.get(own_limit)
        if policy is None:
            policy = self._policies[own_limit] = _Policy(parse_rate_limit(own_limit))
        return policy

    async def charge(self, identity: str, own_limit: str | None, cost: int) -> Verdict | None:
        """None when the identity has no limit; else whether the request may run and, when
        not, how long to wait."""
        policy = self._policy_for(own_limit)
        if policy is None:
            return None
        try:
            for limit in policy.limits:
                if limit.chunk > cost and await self._from_reserve(identity, limit, cost):
                    continue
                if not await self._limiter.hit(limit.item, identity, cost=cost):
                    stats = await self._limiter.get_window_stats(limit.item, identity)
                    wait = max(1, math.ceil(stats.reset_time - time.time()))
                    return Verdict(False, policy.allowed.policy, limit.item.amount, wait)
        except StorageError as exc:
            # A read API stays up when its quota store is down: let requests through.
            self._storage_failed(exc)
            return None
        return policy.allowed

    async def _from_reserve(self, identity: str, limit: _Limit, cost: int) -> bool:
        """Whether the request was paid from permits this process holds; False: near the
        limit, charge it to the store alone."""
        slot = (identity, limit.key)
        reserve = self._reserves.get(slot)
        if reserve is None:
            if len(self._reserves) >= _RESERVATIONS:
                self._reserves.clear()
            reserve = self._reserves[slot] = _Reserve()
        while not reserve.take(cost, time.monotonic()):
            # One refill at a time: else each request in flight would reserve a chunk.
            refill = reserve.refill or self._start_refill(identity, limit, reserve)
            if not await asyncio.shield(refill):
                return False
        if reserve.runs_low(limit.chunk):
            self._start_refill(identity, limit, reserve)
        return True

    def _start_refill(self, identity: str, limit: _Limit, reserve: _Reserve) -> asyncio.Task[bool]:
        reserve.refill = asyncio.create_task(self._refill(identity, limit, reserve))
        return reserve.refill

    async def _refill(self, identity: str, limit: _Limit, reserve: _Reserve) -> bool:
        """Count a chunk in the store for this process; False when the store refuses (near the
        limit) or cannot be reached (the request then finds out by itself)."""
        # Counted in the window from the moment asked: usable only while they are in it.
        until = time.monotonic() + limit.item.get_expiry()
        try:
            granted = await self._limiter.hit(limit.item, identity, cost=limit.chunk)
        except StorageError as exc:
            self._storage_failed(exc)
            return False
        finally:
            reserve.refill = None
        if granted:
            reserve.add(limit.chunk, until)
        return granted

    def _storage_failed(self, exc: StorageError) -> None:
        if time.monotonic() - self._storage_failed_at > _STORAGE_WARNING_SECONDS:  # once a minute
            self._storage_failed_at = time.monotonic()
            log.warning("quota storage unavailable: requests are not limited", error=str(exc))


class ConcurrencyCaps:
    """How many streams and exports each key has open in this process."""

    def __init__(self, max_streams: int, max_exports: int) -> None:
        self._caps = {"stream": max_streams, "export": max_exports}
        self._open: Counter[tuple[str, str]] = Counter()

    @staticmethod
    def kind_of(path: str) -> str | None:
        if path in STREAM_PATHS:
            return "stream"
        if path in EXPORT_PATHS:
            return "export"
        return None

    def cap(self, kind: str) -> int:
        return self._caps[kind]

    @contextmanager
    def holding(self, kind: str, identity: str) -> Iterator[bool]:
        """Yields whether `identity` may open one more of `kind`; holds the slot meanwhile."""
        slot = (kind, identity)
        if self._open[slot] >= self._caps[kind]:
            yield False
            return
        self._open[slot] += 1
        try:
            yield True
        finally:
            self._open[slot] -= 1
            if not self._open[slot]:
                del self._open[slot]
