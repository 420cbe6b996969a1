"""One ingestion tick: fetch every ticker's price and store the tick in one transaction.

This is the only ingestion logic; the Celery task, the embedded scheduler and
`crypto-client ingest` all call `ingest_tick` (through `IngestionRuntime.run_tick`).
"""

import time
from collections.abc import Sequence
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

from crypto_client.clients.source import FetchResult, PriceSource
from crypto_client.db.engine import is_database_unavailable
from crypto_client.db.repository import PriceWriter
from crypto_client.domain import NewPrice

log = structlog.get_logger(__name__)

Status = Literal["stored", "duplicate", "failed"]


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
    source: PriceSource,
    engine: AsyncEngine,
    tickers: Sequence[str],
    *,
    slot_ts: int | None,
    max_write_delay_seconds: float,
) -> TickSummary:
    """Fetch every ticker concurrently and store the tick, at most once per slot.

    Rows carry `ts` from Deribit's clock (`usOut`, the time the server sent the price), or
    the local clock if an answer lacks it. When the database is unreachable, the fetched prices
    are kept and the write retried with backoff for `max_write_delay_seconds`.
    """
    started = time.monotonic()
    summary = TickSummary(slot_ts=slot_ts)
    bound = log.bind(slot_ts=slot_ts)
    bound.info("tick started", tickers=len(tickers))

    fetched: list[FetchResult] = await source.fetch_prices(tickers)
    rows: list[NewPrice] = []
    for result in fetched:
        observation = result.observation
        if observation is None:
            bound.error(
                "ticker failed", ticker=result.ticker, attempt=result.attempts, error=str(result.error)
            )
            summary.outcomes.append(TickerOutcome(result.ticker, "failed", error=str(result.error)))
            continue
        server_us = observation.server_time_us
        ts = (
            server_us // 1_000_000
            if isinstance(server_us, int) and server_us
            else int(observation.received_at)
        )
        rows.append(NewPrice(result.ticker, observation.price, ts, slot_ts))

    if rows:
        try:
            inserted = await _store(engine, rows, max_write_delay_seconds, bound)
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
    rows: list[NewPrice],
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
