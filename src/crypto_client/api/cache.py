"""A short-lived in-process cache for `/prices/latest`, the endpoint dashboards poll."""

import time
from collections.abc import Callable

from crypto_client.domain import PriceRow


class LatestPriceCache:
    """Remembers each ticker's latest-price answer for `ttl_seconds`.

    A new price is at most `ttl_seconds` late on this endpoint (ticks are
    INGEST_INTERVAL_SECONDS apart), and a hot poll costs no database round trip. Only found
    prices are kept, so the cache holds at most one entry per stored ticker.
    """

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[str, tuple[float, PriceRow]] = {}

    def get(self, ticker: str) -> PriceRow | None:
        entry = self._entries.get(ticker)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def put(self, ticker: str, row: PriceRow) -> None:
        if self._ttl > 0:
            self._entries[ticker] = (self._clock() + self._ttl, row)
