"""A short-lived in-process cache for `/prices/latest`, the endpoint dashboards poll."""

import asyncio
import time
from collections.abc import Awaitable, Callable

from crypto_client.domain import PriceRow

Loader = Callable[[], Awaitable[PriceRow | None]]


class LatestPriceCache:
    """Remembers each ticker's latest price for `ttl_seconds`, loading it at most once at a
    time (single flight).

    A new price is at most `ttl_seconds` late on this endpoint, and a hot poll costs no
    database round trip. When an entry expires under load, the first request starts one load
    and every other request for that ticker waits for the same one, instead of all of them
    asking the database at once. The load runs as its own task, so a client that leaves does
    not cancel it for the others. Only found prices are kept.
    """

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[str, tuple[float, PriceRow]] = {}
        self._loading: dict[str, asyncio.Task[PriceRow | None]] = {}

    async def get(self, ticker: str, load: Loader) -> PriceRow | None:
        entry = self._entries.get(ticker)
        if entry is not None and entry[0] > self._clock():
            return entry[1]
        task = self._loading.get(ticker)
        if task is None:
            task = asyncio.create_task(self._load(ticker, load), name=f"latest-{ticker}")
            self._loading[ticker] = task
            task.add_done_callback(lambda done: self._loaded(ticker, done))
        return await asyncio.shield(task)

    async def _load(self, ticker: str, load: Loader) -> PriceRow | None:
        row = await load()
        if row is not None and self._ttl > 0:
            self._entries[ticker] = (self._clock() + self._ttl, row)
        return row

    def _loaded(self, ticker: str, task: asyncio.Task[PriceRow | None]) -> None:
        self._loading.pop(ticker, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have left
