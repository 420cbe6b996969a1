"""What every ingestion runner opens: the write engine and the price source, closed together.

The embedded scheduler, the Celery task, `crypto-client ingest` and the benchmark all open an
`IngestionRuntime`, so pool sizes, clients and shutdown are decided here once.
"""

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.deribit.history import HistoryClient, RequestPacer
from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.clients.deribit.ws import DeribitStream
from crypto_client.clients.source import HistorySource, PriceSource
from crypto_client.clients.trade_source import TradeHistorySource
from crypto_client.config import Settings
from crypto_client.db.engine import create_engine
from crypto_client.domain import SlotFailure
from crypto_client.ingestion.backfill import BackfillReport, backfill
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.maintenance import MaintenanceReport, maintain_storage
from crypto_client.ingestion.settlements import SettlementReport, update_settlements
from crypto_client.ingestion.stream import StreamWriter
from crypto_client.ingestion.tick import TickSummary, ingest_tick
from crypto_client.ingestion.trade_backfill import ProgressCallback, TradeBackfillReport, trade_backfill

log = structlog.get_logger(__name__)

# A tick writes in one transaction; a second connection lets the next tick start while a
# slow one still holds the first.
WRITE_POOL_SIZE = 2
# The automatic repair looks this far back, and leaves the newest slots to ingestion (a tick
# may still be writing them).
RECENT_REPAIR_SECONDS = 86_400
RECENT_REPAIR_SKIPS_SLOTS = 2
# A crashed stream consumer is started again after this, doubled per crash in a row (up to
# the maximum); a run that delivered prices ends the row.
STREAM_RESTART_BACKOFF_SECONDS = 1.0
STREAM_RESTART_MAX_BACKOFF_SECONDS = 60.0


@dataclass
class StreamHealth:
    """The stream consumer of this process as `/readyz` reports it."""

    stream: DeribitStream | None = None  # None while it is not running
    crash: str | None = None  # why it last stopped, while it waits to start again

    @property
    def running(self) -> bool:
        return self.stream is not None

    def describe(self) -> str:
        if self.stream is None:
            return f"not running: {(self.crash or 'not started')[:200]}"
        return "connected" if self.stream.connected.is_set() else "connecting"


def deribit_http_client(settings: Settings, base_url: str | None = None) -> DeribitHttpClient:
    return DeribitHttpClient(
        base_url or settings.deribit_rpc_url,
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
    history: HistorySource
    # The source's clock offset is measured across the ticks of this process.
    clock: SourceClock = field(default_factory=SourceClock)
    # Ledger entries waiting for the database.
    unrecorded: list[SlotFailure] = field(default_factory=list)
    # Deribit's trades and delivery prices (None: a runtime that only ingests).
    trades: TradeHistorySource | None = None

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

    async def run_stream(self, health: StreamHealth | None = None) -> None:
        """Store Deribit's WebSocket prices of every configured ticker until cancelled; a
        consumer that crashes is started again (with backoff), its state in `health`."""
        # The stream's timestamps are another clock than HTTP's usOut: measured apart.
        writer = StreamWriter(
            self.engine,
            self.settings.ingest_interval_seconds,
            self.settings.ingest_max_write_delay_seconds,
            SourceClock(),
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._consume(writer, health or StreamHealth()))
                tasks.create_task(writer.flush_forever())
        finally:
            await writer.flush()  # what arrived before the stop is kept

    async def _consume(self, writer: StreamWriter, health: StreamHealth) -> None:
        crashes = 0
        while True:
            stream = DeribitStream(
                self.settings.deribit_ws_url, stall_seconds=self.settings.stream_stall_seconds
            )
            health.stream, health.crash = stream, None
            try:
                await stream.run(self.settings.tickers, writer.on_observation)
            except Exception as exc:  # a bug: the next consumer starts clean
                crashes = 1 if stream.prices else crashes + 1
                wait = random.uniform(0.5, 1) * min(
                    STREAM_RESTART_MAX_BACKOFF_SECONDS, STREAM_RESTART_BACKOFF_SECONDS * 2 ** (crashes - 1)
                )
                health.stream, health.crash = None, f"{type(exc).__name__}: {exc}"
                metrics.STREAM_RESTARTS.inc()
                log.exception(
                    "price stream consumer crashed, restarting",
                    url=self.settings.deribit_ws_url,
                    crashes_in_a_row=crashes,
                    wait_seconds=round(wait, 2),
                )
                await asyncio.sleep(wait)

    async def maintain_storage(self) -> MaintenanceReport:
        """Partitions ahead of time, and what `RETENTION_DAYS` no longer keeps."""
        return await maintain_storage(
            self.engine,
            retention_days=self.settings.retention_days,
            interval_seconds=self.settings.ingest_interval_seconds,
        )

    async def trade_backfill(
        self,
        tickers: tuple[str, ...] | None = None,
        *,
        from_ts: int | None = None,
        to_ts: int | None = None,
        extend_tracking: bool = False,
        dry_run: bool = False,
        progress: ProgressCallback | None = None,
    ) -> list[TradeBackfillReport]:
        if self.trades is None:
            raise RuntimeError("this runtime was opened without Deribit's trade history")
        return await trade_backfill(
            self.engine,
            self.trades,
            tickers or self.settings.tickers,
            interval_seconds=self.settings.ingest_interval_seconds,
            from_ts=from_ts,
            to_ts=to_ts,
            extend_tracking=extend_tracking,
            dry_run=dry_run,
            progress=progress,
        )

    async def update_settlements(self) -> list[SettlementReport]:
        """The daily settlements job: Deribit's delivery prices of every configured ticker."""
        if self.trades is None:
            raise RuntimeError("this runtime was opened without Deribit's history methods")
        return await update_settlements(self.engine, self.trades, self.settings.tickers)

    async def repair_recent(self) -> list[BackfillReport]:
        """The automatic repair: the recent gaps of every configured ticker, from the chart,
        then what the chart cannot fill at the slot's resolution from the first trade in it."""
        now = int(time.time())
        newest = now - RECENT_REPAIR_SKIPS_SLOTS * self.settings.ingest_interval_seconds
        reports = await self.backfill(
            from_ts=now - RECENT_REPAIR_SECONDS, to_ts=newest, retry_unrepairable=False
        )
        if self.trades is not None:
            await self.trade_backfill(from_ts=now - RECENT_REPAIR_SECONDS, to_ts=newest)
        return reports


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[IngestionRuntime]:
    """The engine and Deribit client of one process (one event loop), closed on exit."""
    engine = create_engine(settings.database_url_value, pool_size=WRITE_POOL_SIZE)
    source = deribit_http_client(settings)
    history_host = deribit_http_client(settings, settings.deribit_history_url)
    trades = HistoryClient(source, history_host, RequestPacer(settings.deribit_history_requests_per_second))
    try:
        yield IngestionRuntime(settings, engine, source, source, trades=trades)
    finally:
        await history_host.aclose()
        await source.aclose()
        await engine.dispose()
