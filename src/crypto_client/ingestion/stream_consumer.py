"""The stream consumer: a `StreamingSource`'s prices into a `StreamWriter`, with a consumer
that crashes started again (with backoff), and its state as `/readyz` reports it."""

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.source import StreamingSource
from crypto_client.config import Settings
from crypto_client.db.origins import WriterOrigin, declare_origin
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.stream import StreamWriter

log = structlog.get_logger(__name__)

# A crashed stream consumer is started again after this, doubled per crash in a row (up to
# the maximum); a run that delivered prices ends the row.
STREAM_RESTART_BACKOFF_SECONDS = 1.0
STREAM_RESTART_MAX_BACKOFF_SECONDS = 60.0
# How often a running stream consumer says what it did: operators see it is alive.
STREAM_REPORT_SECONDS = 300.0


@dataclass
class StreamHealth:
    """The stream consumer of this process as `/readyz` reports it."""

    stream: StreamingSource | None = None  # None while it is not running
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

    def __init__(self, stream: StreamingSource) -> None:
        self.stream = stream

    @property
    def origin(self) -> str:
        return self.stream.origin

    @property
    def answered(self) -> bool:
        return self.stream.answered


async def consume_stream(
    engine: AsyncEngine,
    settings: Settings,
    new_stream: Callable[[], StreamingSource],
    setting: str,
    health: StreamHealth,
    report_every_seconds: float = STREAM_REPORT_SECONDS,
) -> None:
    """Store the prices of every configured ticker from streams made by `new_stream` (the
    source `setting` names) until cancelled."""
    latest = _LatestStream(new_stream())
    origin = WriterOrigin(latest, setting, settings.allow_origin_change)
    # The stream's timestamps are another clock than HTTP's usOut: measured apart.
    writer = StreamWriter(
        declare_origin(engine, origin),
        settings.ingest_interval_seconds,
        settings.ingest_max_write_delay_seconds,
        SourceClock(),
    )
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_consume(settings, writer, health, latest, new_stream))
            tasks.create_task(writer.flush_forever())
            tasks.create_task(_report_stream(writer, health, report_every_seconds))
    finally:
        await writer.flush()  # what arrived before the stop is kept


async def _consume(
    settings: Settings,
    writer: StreamWriter,
    health: StreamHealth,
    latest: _LatestStream,
    new_stream: Callable[[], StreamingSource],
) -> None:
    crashes = 0
    stream = latest.stream
    while True:
        latest.stream = stream
        health.stream, health.crash = stream, None
        try:
            await stream.run(settings.tickers, writer.on_observation)
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
                url=settings.deribit_ws_url,
                crashes_in_a_row=crashes,
                wait_seconds=round(wait, 2),
            )
            await asyncio.sleep(wait)
            stream = new_stream()


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
