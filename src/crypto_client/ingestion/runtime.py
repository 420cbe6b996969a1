"""What every ingestion runner opens: the write engine and the price sources, closed together.

The embedded scheduler, the Celery tasks, `crypto-client ingest` and the benchmark all open an
`IngestionRuntime`, so pool sizes, sources and shutdown are decided here once. The sources
come from `clients/factory.py`; this module sees only their protocols.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.factory import (
    STREAM_SETTING,
    identify_origin,
    longest_fetch_seconds,
    open_sources,
    open_stream_sources,
    source_urls,
)
from crypto_client.clients.source import HistorySource, PriceSource
from crypto_client.clients.trade_source import TradeHistorySource
from crypto_client.config import Settings
from crypto_client.db.engine import create_engine, describe_database, is_database_unavailable
from crypto_client.db.origins import (
    OVERRIDE_SETTING,
    DataOriginError,
    WriterOrigin,
    declare_origin,
    stored_origins,
)
from crypto_client.domain import SlotFailure
from crypto_client.ingestion.backfill import BackfillReport, backfill, repairable_until
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.maintenance import MaintenanceReport, maintain_storage
from crypto_client.ingestion.settlements import SettlementReport, update_settlements
from crypto_client.ingestion.stream_consumer import STREAM_REPORT_SECONDS, StreamHealth, consume_stream
from crypto_client.ingestion.tick import TickSummary, ingest_tick
from crypto_client.ingestion.trade_backfill import ProgressCallback, TradeBackfillReport, trade_backfill

log = structlog.get_logger(__name__)

# A tick writes in one transaction; a second connection lets the next tick start while a
# slow one still holds the first.
WRITE_POOL_SIZE = 2
# The automatic repair looks this far back.
RECENT_REPAIR_SECONDS = 86_400

# What a write may take beyond the write bound: the last backoff before it (the tick's store
# waits at most 5 s between attempts) and one attempt (a pool wait and a connect, 5 s each).
LAST_WRITE_ATTEMPT_SECONDS = 15.0


def pending_write_seconds(settings: Settings) -> float:
    """How long after its slot ends a polled or streamed price may still wait in memory to be
    written, in any process of the deployment; the back-fill leaves a slot alone until then,
    so that the observation wins its slot.

    A tick writes once every ticker's fetch is over (`longest_fetch_seconds`), then retries
    the write for `INGEST_MAX_WRITE_DELAY_SECONDS`; a stream batch may first wait for the
    batch before it to finish retrying.
    """
    fetch = longest_fetch_seconds(settings)
    delay = settings.ingest_max_write_delay_seconds
    return max(fetch + delay, 2 * delay) + LAST_WRITE_ATTEMPT_SECONDS


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
    # Held while the automatic repair runs: one at a time per process.
    repairing: asyncio.Lock = field(default_factory=asyncio.Lock)
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
        automatic: bool = False,
    ) -> list[BackfillReport]:
        return await backfill(
            self.engine,
            self.history,
            tickers or self.settings.tickers,
            interval_seconds=self.settings.ingest_interval_seconds,
            pending_write_seconds=pending_write_seconds(self.settings),
            retry_backoff_seconds=self.settings.backfill_interval_seconds,
            from_ts=from_ts,
            to_ts=to_ts,
            dry_run=dry_run,
            automatic=automatic,
        )

    async def run_stream(
        self, health: StreamHealth | None = None, *, report_every_seconds: float = STREAM_REPORT_SECONDS
    ) -> None:
        """Store the stream's prices of every configured ticker until cancelled; a consumer
        that crashes is started again (with backoff), its state in `health`. Every
        `report_every_seconds` one line says what the stream did since the last."""
        async with open_stream_sources(self.settings) as new_stream:
            await consume_stream(
                self.engine,
                self.settings,
                new_stream,
                STREAM_SETTING,
                health or StreamHealth(),
                report_every_seconds,
            )

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
            pending_write_seconds=pending_write_seconds(self.settings),
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

    async def repair_recent(self) -> list[BackfillReport] | None:
        """The automatic repair: the recent gaps of every configured ticker, from the chart,
        then what the chart cannot fill at the slot's resolution from the first trade in it.
        None when the previous repair of this process still runs (two would fetch the same
        history)."""
        if self.repairing.locked():
            log.info("repair still running, skipping this run")
            return None
        async with self.repairing:
            moment = time.time()
            since = int(moment) - RECENT_REPAIR_SECONDS
            # One bound for both, so the chart has the first pick of every slot it can fill.
            interval = self.settings.ingest_interval_seconds
            until = repairable_until(moment, pending_write_seconds(self.settings), interval, None)
            reports = await self.backfill(from_ts=since, to_ts=until, automatic=True)
            if self.trades is not None:
                await self.trade_backfill(from_ts=since, to_ts=until)
            return reports


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[IngestionRuntime]:
    """The engine and price sources of one process (one event loop), closed on exit."""
    engine = create_engine(settings.database_url_value, pool_size=WRITE_POOL_SIZE)
    try:
        async with open_sources(settings) as sources:
            origin = WriterOrigin(sources.polled, sources.polled_setting, settings.allow_origin_change)
            polled = sources.polled
            yield IngestionRuntime(
                settings, declare_origin(engine, origin), polled, polled, trades=sources.trades
            )
    finally:
        await engine.dispose()


async def check_data_origin(settings: Settings, *, poll: bool = True, stream: bool = False) -> None:
    """Before a runner writes: raise `DataOriginError` when the database holds prices of
    another origin than its sources' (the polled source, and the stream when `stream`), unless
    `ALLOW_ORIGIN_CHANGE` (then it says so). Every write checks again: this only fails early."""
    url = settings.database_url_value
    engine = create_engine(url, pool_size=1)
    try:
        stored = await stored_origins(engine)
    except Exception as exc:
        if not is_database_unavailable(exc):
            raise
        log.warning("data origin not checked at start: the database is unreachable", error=repr(exc))
        return
    finally:
        await engine.dispose()
    if stored.first is None:
        return
    for setting, source_url in source_urls(settings, poll=poll, stream=stream):
        origin = await identify_origin(source_url, settings)
        if origin is None:
            log.warning("data origin not checked at start: the source did not answer", setting=setting)
        elif origin != stored.first:
            if not settings.allow_origin_change:
                database = f"the database {describe_database(url)}"
                raise DataOriginError(stored.first, origin, setting, database)
            log.warning(
                f"writing prices of another origin: {OVERRIDE_SETTING} is set",
                database_origin=stored.first,
                writer_origin=origin,
                setting=setting,
            )
