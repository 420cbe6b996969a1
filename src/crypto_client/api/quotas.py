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
# process spends them locally. Limits below RESERVE_DIVISOR * 2 stay exact, one trip each;
# above, a key may get up to 1 % per process fewer than its limit in a window, never more.
RESERVE_DIVISOR = 100
_RESERVATIONS = 10_000


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    policy: str  # the draft RateLimit-Policy header: "100;w=1, 10000;w=3600"
    limit: int = 0
    retry_after: int = 0


def _policy(items: tuple[RateLimitItem, ...]) -> str:
    return ", ".join(f"{item.amount};w={item.get_expiry()}" for item in items)


class Quotas:
    """Charges requests to identities ("key:NAME" or "address:IP") against their limits."""

    def __init__(self, storage_url: str, default_limit: str | None) -> None:
        options = {"implementation": "redispy"} if storage_url.startswith(("redis", "rediss")) else {}
        self._storage = storage_from_string(f"async+{storage_url}", wrap_exceptions=True, **options)
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._default = parse_rate_limit(default_limit) if default_limit else ()
        self._parsed: dict[str, tuple[RateLimitItem, ...]] = {}
        self._storage_failed_at = 0.0
        # Permits this process counted ahead in the store: (left, usable until, monotonic).
        self._reserved: dict[tuple[str, str], tuple[int, float]] = {}
        self._refilling: dict[tuple[str, str], asyncio.Future[None]] = {}

    def limits_for(self, own_limit: str | None) -> tuple[RateLimitItem, ...]:
        if own_limit is None:
            return self._default
        items = self._parsed.get(own_limit)
        if items is None:
            items = self._parsed[own_limit] = parse_rate_limit(own_limit)
        return items

    async def charge(self, identity: str, own_limit: str | None, cost: int) -> Verdict | None:
        """None when the identity has no limit; else whether the request may run and, when
        not, how long to wait."""
        items = self.limits_for(own_limit)
        if not items:
            return None
        policy = _policy(items)
        try:
            for item in items:
                if await self._from_reserve(identity, item, cost):
                    continue
                if not await self._limiter.hit(item, identity, cost=cost):
                    stats = await self._limiter.get_window_stats(item, identity)
                    wait = max(1, math.ceil(stats.reset_time - time.time()))
                    return Verdict(False, policy, item.amount, wait)
        except StorageError as exc:
            # A read API stays up when its quota store is down: let requests through and say so
            # (at most once a minute per process).
            if time.monotonic() - self._storage_failed_at > 60:
                self._storage_failed_at = time.monotonic()
                log.warning("quota storage unavailable: requests are not limited", error=str(exc))
            return None
        return Verdict(True, policy, items[0].amount)

    async def _from_reserve(self, identity: str, item: RateLimitItem, cost: int) -> bool:
        """Whether the request was paid from permits this process holds, reserving a chunk
        when the limit is high enough; False: charge it to the store alone."""
        chunk = max(cost, item.amount // RESERVE_DIVISOR)
        if chunk == cost:
            return False
        slot = (identity, item.key_for())
        while not self._take_reserved(identity, item, cost):
            refilling = self._refilling.get(slot)
            if refilling is not None:  # one refill at a time: else each request in flight reserves
                await asyncio.shield(refilling)
                continue
            refill = self._refilling[slot] = asyncio.get_running_loop().create_future()
            try:
                if not await self._limiter.hit(item, identity, cost=chunk):
                    return False  # near the limit: exact, one permit at a time
                self._reserve(identity, item, chunk - cost)
                return True
            finally:
                del self._refilling[slot]
                refill.set_result(None)
        return True

    def _take_reserved(self, identity: str, item: RateLimitItem, cost: int) -> bool:
        held = self._reserved.get((identity, item.key_for()))
        if held is None or held[1] <= time.monotonic() or held[0] < cost:
            return False
        self._reserved[(identity, item.key_for())] = (held[0] - cost, held[1])
        return True

    def _reserve(self, identity: str, item: RateLimitItem, permits: int) -> None:
        if len(self._reserved) >= _RESERVATIONS:
            self._reserved.clear()
        # Counted in the window from now on: usable only while they are in it.
        self._reserved[(identity, item.key_for())] = (permits, time.monotonic() + item.get_expiry())


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
