"""One ingestion tick: fetch every ticker's index price and store the tick in one transaction.

This is the only ingestion logic; the Celery task, the embedded scheduler and
`crypto-client ingest` all call `ingest_tick`.
"""

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from crypto_client.clients.deribit import DeribitClient, FetchResult
from crypto_client.clients.errors import RetriesExhaustedError
from crypto_client.config import Settings
from crypto_client.db.engine import is_database_unavailable
from crypto_client.db.repository import NewTick, PriceWriter

log = structlog.get_logger(__name__)

Status = Literal["stored", "duplicate", "failed"]


def current_slot(interval_seconds: int, now: float | None = None) -> int:
    """The start (UNIX seconds) of the schedule slot that `now` falls in."""
    moment = time.time() if now is None else now
    return int(moment // interval_seconds) * interval_seconds


@dataclass(frozen=True, slots=True)
class TickerOutcome:
    ticker: str
    status: Status
    price: Decimal | None = None
    ts: int | None = None
    error: str | None = None


@dataclass(slots=True)
class TickSummary:
    slot_ts: int | None
    outcomes: list[TickerOutcome] = field(default_factory=list)
    duration_seconds: float = 0.0

    def count(self, status: Status) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0


async def ingest_tick(
    client: DeribitClient, engine: AsyncEngine, settings: Settings, *, slot_ts: int | None
) -> TickSummary:
    """Fetch every configured ticker concurrently and store the tick, at most once per slot.

    Rows carry `ts` from Deribit's clock (`usOut`, the time the server sent the price), or
    the local clock if an answer lacks it. When the database is unreachable, the fetched prices
    are kept and the write retried with backoff for `INGEST_MAX_WRITE_DELAY_SECONDS`.
    """
    tickers = settings.tickers
    started = time.monotonic()
    summary = TickSummary(slot_ts=slot_ts)
    bound = log.bind(slot_ts=slot_ts)
    bound.info("tick started", tickers=len(tickers))

    fetched: list[FetchResult] = await client.fetch_many(tickers)
    rows: list[NewTick] = []
    for result in fetched:
        if result.price is None:
            attempts = result.error.attempts if isinstance(result.error, RetriesExhaustedError) else 1
            bound.error("ticker failed", ticker=result.ticker, attempt=attempts, error=str(result.error))
            summary.outcomes.append(TickerOutcome(result.ticker, "failed", error=str(result.error)))
            continue
        server_us = result.price.server_time_us
        ts = server_us // 1_000_000 if server_us else int(time.time())
        rows.append(NewTick(result.ticker, result.price.price, ts, slot_ts))

    if rows:
        try:
            inserted = await _store(engine, rows, settings.ingest_max_write_delay_seconds, bound)
        except Exception as exc:
            # The prices go into the log line: it is the last place they exist.
            lost = [{"ticker": row.ticker, "price": str(row.price), "ts": row.ts} for row in rows]
            bound.error("tick lost: database write failed", error=repr(exc), rows=lost)
            summary.outcomes.extend(
                TickerOutcome(row.ticker, "failed", row.price, row.ts, f"database write failed: {exc!r}")
                for row in rows
            )
        else:
            for row in rows:
                status: Status = "stored" if (row.ticker, row.ts) in inserted else "duplicate"
                summary.outcomes.append(TickerOutcome(row.ticker, status, row.price, row.ts))

    summary.duration_seconds = time.monotonic() - started
    bound.info(
        "tick finished",
        stored=summary.count("stored"),
        duplicate=summary.count("duplicate"),
        failed=summary.count("failed"),
        duration_ms=round(summary.duration_seconds * 1000, 1),
    )
    return summary


async def _store(
    engine: AsyncEngine,
    rows: list[NewTick],
    max_write_delay_seconds: float,
    bound: structlog.stdlib.BoundLogger,
) -> set[tuple[str, int]]:
    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        bound.warning(
            "database unavailable, keeping the tick and retrying",
            attempt=state.attempt_number,
            wait_seconds=round(state.upcoming_sleep, 2),
            tickers=[row.ticker for row in rows],
            cause=repr(error),
        )

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_database_unavailable),
        stop=stop_after_delay(max_write_delay_seconds),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        before_sleep=log_retry,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            async with engine.begin() as connection:
                return set(await PriceWriter(connection).insert_many(rows))
    raise AssertionError("unreachable: tenacity either returns or raises")
