"""What every ingestion runner opens: the write engine and the price source, closed together.

The embedded scheduler, the Celery task, `crypto-client ingest` and the benchmark all open an
`IngestionRuntime`, so pool sizes, clients and shutdown are decided here once.
"""

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.deribit.http import MAX_BACKOFF_SECONDS, DeribitHttpClient
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

log = structlog.get_logger(__name__)

# A tick writes in one transaction; a second connection lets the next tick start while a
# slow one still holds the first.
WRITE_POOL_SIZE = 2
# The automatic repair looks this far back.
RECENT_REPAIR_SECONDS = 86_400
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


# What a write may take beyond the write bound: the last backoff before it (the tick's store
# waits at most 5 s between attempts) and one attempt (a pool wait and a connect, 5 s each).
LAST_WRITE_ATTEMPT_SECONDS = 15.0


def pending_write_seconds(settings: Settings) -> float:
    """How long after its slot ends a polled or streamed price may still wait in memory to be
    written, in any process of the deployment; the back-fill leaves a slot alone until then,
    so that the observation wins its slot.

    A tick writes once every ticker's fetch is over (in rounds of `DERIBIT_MAX_CONCURRENCY`,
    each with its retries), then retries the write for `INGEST_MAX_WRITE_DELAY_SECONDS`; a
    stream batch may first wait for the batch before it to finish retrying.
    """
    rounds = math.ceil(len(settings.tickers) / settings.deribit_max_concurrency)
    retries = settings.deribit_max_retries
    fetch = rounds * (retries + 1) * settings.deribit_timeout_seconds + retries * MAX_BACKOFF_SECONDS
    delay = settings.ingest_max_write_delay_seconds
    return max(fetch + delay, 2 * delay) + LAST_WRITE_ATTEMPT_SECONDS


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
    # Held while the automatic repair runs: one at a time per process.
    repairing: asyncio.Lock = field(default_factory=asyncio.Lock)

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

    async def repair_recent(self) -> list[BackfillReport] | None:
        """The automatic repair: the recent gaps of every configured ticker. None when the
        previous repair of this process still runs (two would fetch the same history)."""
        if self.repairing.locked():
            log.info("repair still running, skipping this run")
            return None
        async with self.repairing:
            return await self.backfill(from_ts=int(time.time()) - RECENT_REPAIR_SECONDS, automatic=True)


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
