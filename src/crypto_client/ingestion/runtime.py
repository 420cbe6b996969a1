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
from urllib.parse import urlsplit

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.deribit.budget import SharedConnectionBudget
from crypto_client.clients.deribit.history import HistoryClient, RequestPacer
from crypto_client.clients.deribit.http import MAX_BACKOFF_SECONDS, DeribitHttpClient
from crypto_client.clients.deribit.ws import DeribitStream
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
from crypto_client.ingestion.backfill import BackfillReport, backfill
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.maintenance import MaintenanceReport, maintain_storage
from crypto_client.ingestion.settlements import SettlementReport, update_settlements
from crypto_client.ingestion.stream import StreamWriter
from crypto_client.ingestion.tick import TickSummary, ingest_tick
from crypto_client.ingestion.trade_backfill import ProgressCallback, TradeBackfillReport, trade_backfill
from crypto_client.origin import is_deribit_host, origin_of

log = structlog.get_logger(__name__)

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
# How often a running stream consumer says what it did: operators see it is alive.
STREAM_REPORT_SECONDS = 300.0


@dataclass
class StreamHealth:
    """The stream consumer of this process as `/readyz` reports it."""

    stream: DeribitStream | None = None  # None while it is not running
    crash: str | None = None  # why it last stopped, while it waits to start again
    restarts: int = 0
    earlier_reconnects: int = 0  # of the consumers that crashed

    @property
    def reconnects(self) -> int:
        return self.earlier_reconnects + (self.stream.reconnects if self.stream else 0)

    @property
    def running(self) -> bool:
        return self.stream is not None

    def describe(self) -> str:
        if self.stream is None:
            return f"not running: {(self.crash or 'not started')[:200]}"
        return "connected" if self.stream.connected.is_set() else "connecting"


class _LatestStream:
    """The stream consumer running now, as the origin check sees it: a crashed consumer is
    replaced by a new one on the same URL."""

    def __init__(self, stream: DeribitStream) -> None:
        self.stream = stream

    @property
    def origin(self) -> str:
        return self.stream.origin

    @property
    def answered(self) -> bool:
        return self.stream.answered


async def _report_stream(writer: StreamWriter, health: StreamHealth, every_seconds: float) -> None:
    last = (0, 0, 0)
    while True:
        await asyncio.sleep(every_seconds)
        now = (writer.received, writer.stored, health.reconnects)
        log.info(
            "stream running",
            state=health.describe(),
            prices_received=now[0] - last[0],
            rows_stored=now[1] - last[1],
            reconnects=now[2] - last[2],
            restarts=health.restarts,
            period_seconds=every_seconds,
        )
        last = now


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


def shared_budget(settings: Settings, deribit_url: str) -> SharedConnectionBudget | None:
    """The host's Deribit connection budget in Redis, when a broker is configured."""
    url = settings.shared_budget_url
    if url is None:
        return None
    return SharedConnectionBudget(url, deribit_url, settings.deribit_max_connections)


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
        """Store Deribit's WebSocket prices of every configured ticker until cancelled; a
        consumer that crashes is started again (with backoff), its state in `health`. Every
        `report_every_seconds` one line says what the stream did since the last."""
        budget = shared_budget(self.settings, self.settings.deribit_ws_url)
        latest = _LatestStream(self._new_stream(budget))
        origin = WriterOrigin(latest, "DERIBIT_WS_URL", self.settings.allow_origin_change)
        # The stream's timestamps are another clock than HTTP's usOut: measured apart.
        writer = StreamWriter(
            declare_origin(self.engine, origin),
            self.settings.ingest_interval_seconds,
            self.settings.ingest_max_write_delay_seconds,
            SourceClock(),
        )
        health = health or StreamHealth()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._consume(writer, health, latest, budget))
                tasks.create_task(writer.flush_forever())
                tasks.create_task(_report_stream(writer, health, report_every_seconds))
        finally:
            await writer.flush()  # what arrived before the stop is kept
            if budget is not None:
                await budget.aclose()

    def _new_stream(self, budget: SharedConnectionBudget | None) -> DeribitStream:
        settings = self.settings
        return DeribitStream(
            settings.deribit_ws_url, stall_seconds=settings.stream_stall_seconds, budget=budget
        )

    async def _consume(
        self,
        writer: StreamWriter,
        health: StreamHealth,
        latest: "_LatestStream",
        budget: SharedConnectionBudget | None,
    ) -> None:
        crashes = 0
        stream = latest.stream
        while True:
            latest.stream = stream
            health.stream, health.crash = stream, None
            try:
                await stream.run(self.settings.tickers, writer.on_observation)
            except Exception as exc:  # a bug: the next consumer starts clean
                crashes = 1 if stream.prices else crashes + 1
                wait = random.uniform(0.5, 1) * min(
                    STREAM_RESTART_MAX_BACKOFF_SECONDS, STREAM_RESTART_BACKOFF_SECONDS * 2 ** (crashes - 1)
                )
                health.stream, health.crash = None, f"{type(exc).__name__}: {exc}"
                health.restarts += 1
                health.earlier_reconnects += stream.reconnects
                metrics.STREAM_RESTARTS.inc()
                log.exception(
                    "price stream consumer crashed, restarting",
                    url=self.settings.deribit_ws_url,
                    crashes_in_a_row=crashes,
                    wait_seconds=round(wait, 2),
                )
                await asyncio.sleep(wait)
                stream = self._new_stream(budget)

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

    async def repair_recent(self) -> list[BackfillReport] | None:
        """The automatic repair: the recent gaps of every configured ticker, from the chart,
        then what the chart cannot fill at the slot's resolution from the first trade in it.
        None when the previous repair of this process still runs (two would fetch the same
        history)."""
        if self.repairing.locked():
            log.info("repair still running, skipping this run")
            return None
        async with self.repairing:
            since = int(time.time()) - RECENT_REPAIR_SECONDS
            reports = await self.backfill(from_ts=since, automatic=True)
            if self.trades is not None:
                # Like the chart repair, it leaves the slots whose writes may still be pending.
                until = int(time.time() - pending_write_seconds(self.settings))
                await self.trade_backfill(from_ts=since, to_ts=until)
            return reports


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[IngestionRuntime]:
    """The engine and Deribit client of one process (one event loop), closed on exit."""
    engine = create_engine(settings.database_url_value, pool_size=WRITE_POOL_SIZE)
    source = deribit_http_client(settings)
    origin = WriterOrigin(source, "DERIBIT_RPC_URL", settings.allow_origin_change)
    history_host = deribit_http_client(settings, settings.deribit_history_url)
    trades = HistoryClient(source, history_host, RequestPacer(settings.deribit_history_requests_per_second))
    try:
        yield IngestionRuntime(settings, declare_origin(engine, origin), source, source, trades=trades)
    finally:
        await history_host.aclose()
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
