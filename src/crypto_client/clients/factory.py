"""The configured price sources, built from the settings: the one module that names a
concrete client.

Every source is Deribit's today. A second exchange is a package beside `clients/deribit/`
whose clients implement `clients/source.py`'s protocols (`PolledSource`, `StreamingSource`;
for the trade back-fill and the settlements, `clients/trade_source.py`'s), chosen here from
its settings; ingestion sees only the protocols.
"""

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from crypto_client.clients.deribit.budget import SharedConnectionBudget
from crypto_client.clients.deribit.history import HistoryClient, RequestPacer
from crypto_client.clients.deribit.http import MAX_BACKOFF_SECONDS, DeribitHttpClient
from crypto_client.clients.deribit.ws import DeribitStream
from crypto_client.clients.source import PolledSource, StreamingSource
from crypto_client.clients.trade_source import TradeHistorySource
from crypto_client.config import Settings
from crypto_client.origin import is_deribit_host, origin_of

# The settings that name each source, for messages (the origin check names the one to change).
POLLED_SETTING = "DERIBIT_RPC_URL"
STREAM_SETTING = "DERIBIT_WS_URL"


@dataclass(frozen=True, slots=True)
class Sources:
    """What one process polls: current prices with their history, and the trade history."""

    polled: PolledSource
    trades: TradeHistorySource
    polled_setting: str = POLLED_SETTING


def shared_budget(settings: Settings, url: str) -> SharedConnectionBudget | None:
    """The host's Deribit connection budget in Redis, when a broker is configured."""
    redis_url = settings.shared_budget_url
    if redis_url is None:
        return None
    return SharedConnectionBudget(redis_url, url, settings.deribit_max_connections)


def deribit_http_client(settings: Settings, base_url: str | None = None) -> DeribitHttpClient:
    return DeribitHttpClient(
        base_url or settings.deribit_rpc_url,
        timeout=settings.deribit_timeout_seconds,
        max_retries=settings.deribit_max_retries,
        backoff_seconds=settings.deribit_retry_backoff_seconds,
        max_concurrency=settings.deribit_max_concurrency,
        max_connections=settings.deribit_max_connections,
        budget=shared_budget(settings, base_url or settings.deribit_rpc_url),
    )


@asynccontextmanager
async def open_sources(settings: Settings) -> AsyncIterator[Sources]:
    """The polled sources of one process (one event loop), closed on exit."""
    source = deribit_http_client(settings)
    history_host = deribit_http_client(settings, settings.deribit_history_url)
    trades = HistoryClient(source, history_host, RequestPacer(settings.deribit_history_requests_per_second))
    try:
        yield Sources(source, trades)
    finally:
        await history_host.aclose()
        await source.aclose()


@asynccontextmanager
async def open_stream_sources(settings: Settings) -> AsyncIterator[Callable[[], StreamingSource]]:
    """A maker of streaming sources (a crashed consumer is replaced by a new one), which share
    the host's connection budget until the context exits."""
    budget = shared_budget(settings, settings.deribit_ws_url)

    def new_stream() -> StreamingSource:
        return DeribitStream(
            settings.deribit_ws_url, stall_seconds=settings.stream_stall_seconds, budget=budget
        )

    try:
        yield new_stream
    finally:
        if budget is not None:
            await budget.aclose()


def longest_fetch_seconds(settings: Settings) -> float:
    """The longest a polled fetch of every ticker may take: rounds of
    `DERIBIT_MAX_CONCURRENCY` requests, each with its retries and the backoff between them."""
    rounds = math.ceil(len(settings.tickers) / settings.deribit_max_concurrency)
    retries = settings.deribit_max_retries
    return rounds * (retries + 1) * settings.deribit_timeout_seconds + retries * MAX_BACKOFF_SECONDS


def source_urls(settings: Settings, *, poll: bool, stream: bool) -> list[tuple[str, str]]:
    """The setting and URL of each source a runner uses (the polled one, the stream)."""
    urls = [(POLLED_SETTING, settings.deribit_rpc_url)] if poll else []
    return urls + ([(STREAM_SETTING, settings.deribit_ws_url)] if stream else [])


async def identify_origin(url: str, settings: Settings) -> str | None:
    """The origin of the source at `url`: a Deribit host's by its name; any other server's by
    its own answer to `public/test` (over HTTP on the same host, for a WebSocket URL); None
    when it did not answer."""
    if is_deribit_host(url):
        return origin_of(url, simulator=False)
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss"):
        url = f"{parts.scheme.replace('ws', 'http')}://{parts.netloc}/api/v2"
    client = DeribitHttpClient(url, timeout=settings.deribit_timeout_seconds, max_retries=0)
    async with client:
        return client.origin if await client.identify() else None
