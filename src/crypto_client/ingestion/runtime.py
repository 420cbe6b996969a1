"""What every ingestion runner opens: the write engine and the price source, closed together.

The embedded scheduler, the Celery task, `crypto-client ingest` and the benchmark all open an
`IngestionRuntime`, so pool sizes, clients and shutdown are decided here once.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.clients.source import PriceSource
from crypto_client.config import Settings
from crypto_client.db.engine import create_engine
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.tick import TickSummary, ingest_tick

# A tick writes in one transaction; a second connection lets the next tick start while a
# slow one still holds the first.
WRITE_POOL_SIZE = 2


def deribit_http_client(settings: Settings) -> DeribitHttpClient:
    return DeribitHttpClient(
        settings.deribit_rpc_url,
        timeout=settings.deribit_timeout_seconds,
        max_retries=settings.deribit_max_retries,
        backoff_seconds=settings.deribit_retry_backoff_seconds,
        max_concurrency=settings.deribit_max_concurrency,
    )


@dataclass(frozen=True, slots=True)
class IngestionRuntime:
    settings: Settings
    engine: AsyncEngine
    source: PriceSource
    # The source's clock offset is measured across the ticks of this process.
    clock: SourceClock = field(default_factory=SourceClock)

    async def run_tick(self, slot_ts: int | None) -> TickSummary:
        return await ingest_tick(
            self.source,
            self.engine,
            self.settings.tickers,
            slot_ts=slot_ts,
            interval_seconds=self.settings.ingest_interval_seconds,
            max_write_delay_seconds=self.settings.ingest_max_write_delay_seconds,
            clock=self.clock,
        )


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[IngestionRuntime]:
    """The engine and Deribit client of one process (one event loop), closed on exit."""
    engine = create_engine(settings.database_url_value, pool_size=WRITE_POOL_SIZE)
    source = deribit_http_client(settings)
    try:
        yield IngestionRuntime(settings, engine, source)
    finally:
        await source.aclose()
        await engine.dispose()
