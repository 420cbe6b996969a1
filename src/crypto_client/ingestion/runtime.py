"""What every ingestion runner opens: the write engine and the price source, closed together.

The embedded scheduler, the Celery task, `crypto-client ingest` and the benchmark all open an
`IngestionRuntime`, so pool sizes, clients and shutdown are decided here once.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.deribit.budget import SharedConnectionBudget
from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.clients.deribit.ws import DeribitStream
from crypto_client.clients.source import HistorySource, PriceSource
from crypto_client.config import Settings
from crypto_client.db.engine import create_engine
from crypto_client.domain import SlotFailure
from crypto_client.ingestion.backfill import BackfillReport, backfill
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.maintenance import MaintenanceReport, maintain_storage
from crypto_client.ingestion.stream import StreamWriter
from crypto_client.ingestion.tick import TickSummary, ingest_tick

# A tick writes in one transaction; a second connection lets the next tick start while a
# slow one still holds the first.
WRITE_POOL_SIZE = 2
# The automatic repair looks this far back, and leaves the newest slots to ingestion (a tick
# may still be writing them).
RECENT_REPAIR_SECONDS = 86_400
RECENT_REPAIR_SKIPS_SLOTS = 2


def shared_budget(settings: Settings, deribit_url: str) -> SharedConnectionBudget | None:
    """The host's Deribit connection budget in Redis, when a broker is configured."""
    url = settings.shared_budget_url
    if url is None:
        return None
    return SharedConnectionBudget(url, deribit_url, settings.deribit_max_connections)


def deribit_http_client(settings: Settings) -> DeribitHttpClient:
    return DeribitHttpClient(
        settings.deribit_rpc_url,
        timeout=settings.deribit_timeout_seconds,
        max_retries=settings.deribit_max_retries,
        backoff_seconds=settings.deribit_retry_backoff_seconds,
        max_concurrency=settings.deribit_max_concurrency,
        max_connections=settings.deribit_max_connections,
        budget=shared_budget(settings, settings.deribit_rpc_url),
    )


@dataclass(frozen=True, slots=True)
class IngestionRuntime:
    settings: Settings
    engine: AsyncEngine
    source: PriceSource
    history: HistorySource
    # The source's clock offset is measured across the ticks of this process.
    clock: SourceClock = field(default_factory=SourceClock)
    # Ledger entries waiting for the database.
    unrecorded: list[SlotFailure] = field(default_factory=list)

    def __post_init__(self) -> None:
        metrics.set_tickers(self.settings.tickers)

    async def run_tick(self, slot_ts: int | None) -> TickSummary:
        return await ingest_tick(
            self.source,
            self.engine,
            self.settings.tickers,
            slot_ts=slot_ts,
            interval_seconds=self.settings.ingest_interval_seconds,
            max_write_delay_seconds=self.settings.ingest_max_write_delay_seconds,
            clock=self.clock,
            unrecorded=self.unrecorded,
        )

    async def backfill(
        self,
        tickers: tuple[str, ...] | None = None,
        *,
        from_ts: int | None = None,
        to_ts: int | None = None,
        dry_run: bool = False,
        retry_unrepairable: bool = True,
    ) -> list[BackfillReport]:
        return await backfill(
            self.engine,
            self.history,
            tickers or self.settings.tickers,
            interval_seconds=self.settings.ingest_interval_seconds,
            from_ts=from_ts,
            to_ts=to_ts,
            dry_run=dry_run,
            retry_unrepairable=retry_unrepairable,
        )

    async def run_stream(self) -> None:
        """Store Deribit's WebSocket prices of every configured ticker until cancelled."""
        budget = shared_budget(self.settings, self.settings.deribit_ws_url)
        stream = DeribitStream(
            self.settings.deribit_ws_url, stall_seconds=self.settings.stream_stall_seconds, budget=budget
        )
        # The stream's timestamps are another clock than HTTP's usOut: measured apart.
        writer = StreamWriter(
            self.engine,
            self.settings.ingest_interval_seconds,
            self.settings.ingest_max_write_delay_seconds,
            SourceClock(),
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(stream.run(self.settings.tickers, writer.on_observation))
                tasks.create_task(writer.flush_forever())
        finally:
            await writer.flush()  # what arrived before the stop is kept
            if budget is not None:
                await budget.aclose()

    async def maintain_storage(self) -> MaintenanceReport:
        """Partitions ahead of time, and what `RETENTION_DAYS` no longer keeps."""
        return await maintain_storage(
            self.engine,
            retention_days=self.settings.retention_days,
            interval_seconds=self.settings.ingest_interval_seconds,
        )

    async def repair_recent(self) -> list[BackfillReport]:
        """The automatic repair: the recent gaps of every configured ticker."""
        now = int(time.time())
        newest = now - RECENT_REPAIR_SKIPS_SLOTS * self.settings.ingest_interval_seconds
        return await self.backfill(
            from_ts=now - RECENT_REPAIR_SECONDS, to_ts=newest, retry_unrepairable=False
        )


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[IngestionRuntime]:
    """The engine and Deribit client of one process (one event loop), closed on exit."""
    engine = create_engine(settings.database_url_value, pool_size=WRITE_POOL_SIZE)
    source = deribit_http_client(settings)
    try:
        yield IngestionRuntime(settings, engine, source, source)
    finally:
        await source.aclose()
        await engine.dispose()
