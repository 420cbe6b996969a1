"""Quotas: requests per key (or per client address when keys are off) with the `limits`
library's moving window, on Redis shared by every API process or in this process's memory;
and caps on the long requests (open streams, running exports) each key may hold at once.

Over a quota the answer is 429 with an exact `Retry-After`: a moving window remembers when
each request was counted, so the time the oldest one leaves the window is known.
"""

import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs

import structlog
from limits import RateLimitItem, parse_many
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

log = structlog.get_logger(__name__)

# What a request costs against its quota: reading a whole history once costs as much as ten
# ordinary requests.
EXPENSIVE_COST = 10
_EXPENSIVE_PATHS = frozenset({"/prices/export", "/prices/resample"})
STREAM_PATHS = frozenset({"/prices/stream"})
EXPORT_PATHS = frozenset({"/prices/export"})


def parse_rate_limit(text: str) -> tuple[RateLimitItem, ...]:
    """`100/second;10000/hour` as limits; raises `ValueError` saying what is wrong."""
    try:
        items = tuple(parse_many(text))
    except ValueError:
        items = ()
    if not items:
        raise ValueError(f"{text!r} is not a rate limit: e.g. 100/second or 100/second;10000/hour")
    return items


def request_cost(path: str, query_string: bytes) -> int:
    if path in _EXPENSIVE_PATHS:
        return EXPENSIVE_COST
    if path == "/prices/candles" and "from_ts" not in parse_qs(query_string.decode("latin-1")):
        return EXPENSIVE_COST  # from the first row on: a whole history
    return 1


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


class ConcurrencyCaps:
    """How many streams and exports each identity has open in this process."""

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
