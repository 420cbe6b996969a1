"""The embedded scheduler: the periodic jobs (`ingestion.jobs.JOBS`) in `crypto-client serve`'s
own process, without Celery."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog

from crypto_client.config import Settings
from crypto_client.domain import current_slot
from crypto_client.ingestion.jobs import JOBS, PeriodicJob
from crypto_client.ingestion.runtime import open_runtime
from crypto_client.ingestion.stream_consumer import StreamHealth
from crypto_client.ingestion.tick import WRITING, TickSummary

log = structlog.get_logger(__name__)

# On shutdown a tick that is writing gets this long to commit before it is cancelled (and its
# transaction rolled back), so Ctrl-C never waits long and never leaves half a tick; a tick
# still fetching is cancelled at once.
SHUTDOWN_GRACE_SECONDS = 1.0


class IntervalScheduler:
    """Calls `run_slot(slot_ts)` at the start of every slot: now, then on each boundary.

    Ticks run as their own tasks, so one that waits for the database does not delay the next.
    """

    def __init__(self, interval_seconds: int, run_slot: Callable[[int], Awaitable[object]]) -> None:
        self._interval = interval_seconds
        self._run_slot = run_slot
        self._ticks: set[asyncio.Task[object]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="ingestion-scheduler")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in self._ticks - set(WRITING):
            task.cancel()
        if self._ticks:
            _, pending = await asyncio.wait(self._ticks, timeout=SHUTDOWN_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                log.warning("abandoned unfinished ticks on shutdown", ticks=len(pending))

    async def _loop(self) -> None:
        slot = current_slot(self._interval)
        while True:
            # After a stall (suspended host, blocked loop) go on with the current slot: a
            # missed slot cannot be observed late, only mislabelled.
            slot = max(slot, current_slot(self._interval))
            task = asyncio.create_task(self._guarded(slot), name=f"ingest-slot-{slot}")
            self._ticks.add(task)
            task.add_done_callback(self._ticks.discard)
            slot += self._interval
            await asyncio.sleep(max(0.0, slot - time.time()))

    async def _guarded(self, slot: int) -> object:
        try:
            return await self._run_slot(slot)
        except Exception:
            log.exception("tick crashed", slot_ts=slot)
            return None


def _deribit_unreachable(summary: TickSummary) -> bool:
    """Every ticker failed because no connection to Deribit could be made (no network, DNS,
    a proxy), not because of an answer."""
    return bool(summary.outcomes) and all(
        outcome.reason == "deribit_failed" and "connection failed" in (outcome.error or "")
        for outcome in summary.outcomes
    )


@asynccontextmanager
async def embedded_ingestion(
    settings: Settings, stream_health: StreamHealth | None = None
) -> AsyncIterator[None]:
    """Run every job of `JOBS` on its period (the ingest tick every interval, the repair every
    `BACKFILL_INTERVAL_SECONDS`, the storage upkeep every hour, the settlement prices every
    day), until the context exits (the database must be migrated). With `STREAM_ENABLED` the
    stream consumer runs too, its state in `stream_health`."""
    async with open_runtime(settings) as runtime:
        offline_said = False

        def say_once_if_offline(result: object) -> None:
            nonlocal offline_said
            if not offline_said and isinstance(result, TickSummary) and _deribit_unreachable(result):
                offline_said = True
                log.warning(
                    "Deribit is unreachable: no price can be fetched. Without internet, "
                    "`crypto-client serve --simulate` is the offline demo",
                    deribit=settings.deribit_rpc_url,
                    setting="DERIBIT_RPC_URL",
                    error=result.outcomes[0].error,
                )

        def runner(job: PeriodicJob[Any]) -> Callable[[int], Awaitable[object]]:
            async def run(slot: int) -> object:
                result = await job.run(runtime, slot)
                say_once_if_offline(result)
                return result

            return run

        schedulers = [
            IntervalScheduler(period, runner(job)) for job in JOBS if (period := job.period_seconds(settings))
        ]
        for each in schedulers:
            each.start()
        stream = (
            asyncio.create_task(runtime.run_stream(stream_health), name="price-stream")
            if settings.stream_enabled
            else None
        )
        log.info(
            "embedded scheduler started",
            interval_seconds=settings.ingest_interval_seconds,
            backfill_interval_seconds=settings.backfill_interval_seconds,
            tickers=settings.tickers,
        )
        try:
            yield
        finally:
            if stream is not None:
                stream.cancel()
                await asyncio.gather(stream, return_exceptions=True)
            for each in schedulers:
                await each.stop()
            log.info("embedded scheduler stopped")
