"""What every ingestion runner opens: the write engine and the price source, closed together.

The embedded scheduler, the Celery task, `crypto-client ingest` and the benchmark all open an
`IngestionRuntime`, so pool sizes, clients and shutdown are decided here once.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.clients.deribit.ws import DeribitStream
from crypto_client.clients.source import HistorySource, PriceSource
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
from crypto_client.ingestion.backfill import BackfillReport, backfill
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.maintenance import MaintenanceReport, maintain_storage
from crypto_client.ingestion.stream import StreamWriter
from crypto_client.ingestion.tick import TickSummary, ingest_tick
from crypto_client.origin import is_deribit_host, origin_of

log = structlog.get_logger(__name__)

# A tick writes in one transaction; a second connection lets the next tick start while a
# slow one still holds the first.
WRITE_POOL_SIZE = 2
# The automatic repair looks this far back, and leaves the newest slots to ingestion (a tick
# may still be writing them).
RECENT_REPAIR_SECONDS = 86_400
RECENT_REPAIR_SKIPS_SLOTS = 2


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
        stream = DeribitStream(self.settings.deribit_ws_url, stall_seconds=self.settings.stream_stall_seconds)
        origin = WriterOrigin(stream, "DERIBIT_WS_URL", self.settings.allow_origin_change)
        # The stream's timestamps are another clock than HTTP's usOut: measured apart.
        writer = StreamWriter(
            declare_origin(self.engine, origin),
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
    origin = WriterOrigin(source, "DERIBIT_RPC_URL", settings.allow_origin_change)
    try:
        yield IngestionRuntime(settings, declare_origin(engine, origin), source, source)
    finally:
        await source.aclose()
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
    sources = [("DERIBIT_RPC_URL", settings.deribit_rpc_url)] if poll else []
    sources += [("DERIBIT_WS_URL", settings.deribit_ws_url)] if stream else []
    for setting, source_url in sources:
        origin = await _origin_before_writing(source_url, settings)
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


async def _origin_before_writing(url: str, settings: Settings) -> str | None:
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
