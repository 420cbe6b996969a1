"""One ingestion tick: fetch every ticker's price and store the tick in one transaction.

This is the only ingestion logic; the Celery task, the embedded scheduler and
`crypto-client ingest` all call `ingest_tick` (through `IngestionRuntime.run_tick`).
"""

import asyncio
import time
import weakref
from collections.abc import Iterable, Sequence
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

from crypto_client import metrics
from crypto_client.clients.source import Observation, PriceSource
from crypto_client.db.engine import is_database_unavailable
from crypto_client.db.writer import write_transaction
from crypto_client.domain import GapReason, NewPrice, SlotFailure, Source, canonical_price
from crypto_client.ingestion.clock import SourceClock

log = structlog.get_logger(__name__)

Status = Literal["stored", "duplicate", "failed"]
# Ledger entries kept in memory while the database cannot take them; beyond this many the
# oldest are dropped (with a warning): their slots then show as `no_tick_ran`.
MAX_UNRECORDED_FAILURES = 100_000

# Ticks between their first write and their commit: shutdown gives these a moment to commit
# and cancels every other tick (one still fetching loses nothing by stopping) at once.
WRITING: "weakref.WeakSet[asyncio.Task[object]]" = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class TickerOutcome:
    ticker: str
    status: Status
    price: Decimal | None = None
    ts: int | None = None
    error: str | None = None
    reason: GapReason | None = None


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
    interval_seconds: int,
    max_write_delay_seconds: float,
    clock: SourceClock,
    unrecorded: list[SlotFailure],
) -> TickSummary:
    """Fetch every ticker concurrently and store the tick, at most one row per ticker per slot.

    A row's `ts` follows `clock` (see `ingestion.clock`) and lies inside its slot
    (`slot_ts <= ts < slot_ts + interval_seconds`): an observation made after the slot ended is
    reported `late`, never stored under the slot. Each value is checked before the write, so a
    bad one fails alone. When the database is unreachable, the prices are kept and the write
    retried with backoff for `max_write_delay_seconds`.

    The slot's failures go to the ledger (`slot_failures`) and the tickers are marked tracked;
    failures the database cannot take now wait in `unrecorded` for a later tick.
    """
    started = time.monotonic()
    summary = TickSummary(slot_ts=slot_ts)
    bound = log.bind(slot_ts=slot_ts)
    bound.info("tick started", tickers=len(tickers))

    rows: list[NewPrice] = []
    for result in await source.fetch_prices(tickers):
        if result.observation is None:
            bound.error(
                "ticker failed", ticker=result.ticker, attempt=result.attempts, error=str(result.error)
            )
            summary.outcomes.append(
                TickerOutcome(result.ticker, "failed", error=str(result.error), reason="deribit_failed")
            )
            continue
        placed = place(result.observation, clock, slot_ts, interval_seconds, bound)
        if isinstance(placed, TickerOutcome):
            summary.outcomes.append(placed)
        else:
            rows.append(placed)

    database_lost = False
    task = asyncio.current_task()
    if task is not None:
        WRITING.add(task)
    if rows:
        written = await store(engine, rows, max_write_delay_seconds, bound)
        database_lost = written.error is not None
        lost = log_lost(bound, rows, written)
        for row in rows:
            if row in lost:
                in_doubt = " (its COMMIT went unanswered)" if (row.ticker, row.ts) in written.in_doubt else ""
                error = f"database write failed{in_doubt}: {written.error!r}"
                summary.outcomes.append(
                    TickerOutcome(row.ticker, "failed", row.price, row.ts, error, "database_unavailable")
                )
            elif row.ticker in written.rejected:
                error = f"the database refused the row: {written.rejected[row.ticker]}"
                bound.error("ticker failed", ticker=row.ticker, price=str(row.price), ts=row.ts, error=error)
                summary.outcomes.append(
                    TickerOutcome(row.ticker, "failed", row.price, row.ts, error, "invalid_value")
                )
            else:
                summary.outcomes.append(TickerOutcome(row.ticker, written.status_of(row), row.price, row.ts))

    if slot_ts is not None:
        unrecorded.extend(
            SlotFailure(o.ticker, slot_ts, o.reason, o.error or "")
            for o in summary.outcomes
            if o.status == "failed" and o.reason is not None
        )
        if not database_lost:
            await _record(engine, tickers, slot_ts, unrecorded, bound)
        if len(unrecorded) > MAX_UNRECORDED_FAILURES:
            bound.warning(
                "dropping the oldest unrecorded failures", dropped=len(unrecorded) - MAX_UNRECORDED_FAILURES
            )
            del unrecorded[: len(unrecorded) - MAX_UNRECORDED_FAILURES]

    if task is not None:
        WRITING.discard(task)
    summary.duration_seconds = time.monotonic() - started
    count_outcomes("poll", summary.outcomes)
    bound.info(
        "tick finished",
        stored=summary.count("stored"),
        duplicate=summary.count("duplicate"),
        failed=summary.count("failed"),
        duration_ms=round(summary.duration_seconds * 1000, 1),
    )
    return summary


def count_outcomes(source: Source, outcomes: Iterable[TickerOutcome]) -> None:
    for outcome in outcomes:
        metrics.INGEST_OUTCOMES.labels(
            source, metrics.ticker_label(outcome.ticker), outcome.status, outcome.reason or ""
        ).inc()


async def _record(
    engine: AsyncEngine,
    tickers: Sequence[str],
    slot_ts: int,
    unrecorded: list[SlotFailure],
    bound: structlog.stdlib.BoundLogger,
) -> None:
    """Mark `tickers` tracked and write the waiting ledger entries: one short transaction,
    tried once (the prices are already safe; the entries can wait for the next tick)."""
    try:
        async with write_transaction(engine) as writer:
            await writer.track(tickers, slot_ts)
            await writer.record_failures(unrecorded)
    except Exception as exc:
        bound.warning("ledger not written yet, keeping its entries", entries=len(unrecorded), error=repr(exc))
        return
    unrecorded.clear()


def place(
    observation: Observation,
    clock: SourceClock,
    slot_ts: int | None,
    interval_seconds: int,
    bound: structlog.stdlib.BoundLogger,
    source: Source = "poll",
) -> NewPrice | TickerOutcome:
    """The row for `observation` inside its slot, or why there is none: the rules every
    source's prices go through (exact value, the clock rule, a time inside the slot).

    Whatever an observation holds, it fails alone: an error placing it is its own ticker's
    `invalid_value`, never the whole tick's."""
    try:
        return _place(observation, clock, slot_ts, interval_seconds, bound, source)
    except Exception as exc:
        error = f"observation not usable: {exc!r}"
        bound.exception("ticker failed", ticker=observation.ticker, error=error, reason="invalid_value")
        return TickerOutcome(observation.ticker, "failed", error=error, reason="invalid_value")


def _place(
    observation: Observation,
    clock: SourceClock,
    slot_ts: int | None,
    interval_seconds: int,
    bound: structlog.stdlib.BoundLogger,
    source: Source,
) -> NewPrice | TickerOutcome:
    ticker = observation.ticker
    try:
        price = canonical_price(observation.price)
    except ValueError as exc:
        bound.error("ticker failed", ticker=ticker, error=str(exc))
        return TickerOutcome(ticker, "failed", error=str(exc), reason="invalid_value")

    timing = clock.time_of(observation)
    if timing.problem is not None:
        bound.warning(
            "source time not used, storing the local receive time",
            ticker=ticker,
            source_time_us=observation.server_time_us,
            local_time=round(observation.received_at, 6),
            problem=timing.problem,
        )
    ts = int(timing.ts)
    if slot_ts is None:
        return NewPrice(ticker, price, ts, None, source)

    slot_end = slot_ts + interval_seconds
    received = int(observation.received_at)
    if not slot_ts <= ts < slot_end and slot_ts <= received < slot_end:
        ts = received  # the source's clock puts it across a slot edge; ours says where it was seen
    if received >= slot_end:
        error = f"observed at {observation.received_at:.3f}, after its slot {slot_ts}..{slot_end} ended"
        bound.warning("ticker failed", ticker=ticker, error=error, reason="late")
        return TickerOutcome(ticker, "failed", price, None, error, "late")
    if received < slot_ts:
        error = f"observed at {observation.received_at:.3f}, before its slot {slot_ts} began"
        bound.warning("ticker failed", ticker=ticker, error=error, reason="clock_skew")
        return TickerOutcome(ticker, "failed", price, None, error, "clock_skew")
    return NewPrice(ticker, price, ts, slot_ts, source)


@dataclass(slots=True)
class WriteResult:
    """What `store` knows about its rows once it returns."""

    committed: set[tuple[str, int]] = field(default_factory=set)  # `(ticker, ts)` known to be stored
    rejected: dict[str, str] = field(default_factory=dict)  # per ticker, why the database refused it
    # Rows whose COMMIT was sent but never answered: stored or not, nobody knows (yet).
    in_doubt: set[tuple[str, int]] = field(default_factory=set)
    error: Exception | None = None  # set when the write gave up: rows not committed are lost

    def status_of(self, row: NewPrice) -> Status:
        if row.ticker in self.rejected or ((row.ticker, row.ts) not in self.committed and self.error):
            return "failed"
        return "stored" if (row.ticker, row.ts) in self.committed else "duplicate"


async def store(
    engine: AsyncEngine,
    rows: list[NewPrice],
    max_write_delay_seconds: float,
    bound: structlog.stdlib.BoundLogger,
) -> WriteResult:
    """Write `rows` in one transaction, retrying while the database is unavailable for up to
    `max_write_delay_seconds`; only a committed row counts as stored.

    A refusal for a data reason (not an availability one) fails the whole transaction, so the
    rows are then written one by one: the good ones are kept and only the bad one reported.
    A COMMIT whose answer was lost may have committed: the retry finds such a row already
    there (the insert skips it), and a row identical to the one written is this write's own.
    """
    result = WriteResult()

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        bound.warning(
            "database unavailable, keeping the tick and retrying",
            attempt=state.attempt_number,
            wait_seconds=round(state.upcoming_sleep, 2),
            tickers=[row.ticker for row in rows],
            cause=repr(error),
        )

    async def write(batch: list[NewPrice]) -> None:
        new: list[tuple[str, int]] = []
        committing = False
        try:
            async with write_transaction(engine) as writer:
                new = await writer.insert_many(batch)
                doubtful = [row for row in batch if (row.ticker, row.ts) in result.in_doubt]
                new += await writer.stored_exactly(doubtful)
                committing = True
        except Exception:
            if committing:
                result.in_doubt.update(new)
            raise
        result.committed.update(new)
        result.in_doubt.difference_update((row.ticker, row.ts) for row in batch)

    async def write_all() -> None:
        pending = [
            row
            for row in rows
            if (row.ticker, row.ts) not in result.committed and row.ticker not in result.rejected
        ]
        try:
            await write(pending)
            return
        except Exception as exc:
            if is_database_unavailable(exc):
                raise
        for row in pending:
            try:
                await write([row])
            except Exception as exc:
                if is_database_unavailable(exc):
                    raise
                result.rejected[row.ticker] = repr(exc)

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_database_unavailable),
        stop=stop_after_delay(max_write_delay_seconds),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                await write_all()
    except Exception as exc:
        result.error = exc
    return result


def log_lost(
    bound: structlog.stdlib.BoundLogger, rows: Iterable[NewPrice], result: WriteResult
) -> list[NewPrice]:
    """Log the rows `result` could not store (the log line is the last place their prices
    exist) and return them; a row whose COMMIT went unanswered is marked `in_doubt`."""
    lost = [row for row in rows if result.status_of(row) == "failed" and row.ticker not in result.rejected]
    if lost:
        bound.error(
            "tick lost: database write failed",
            error=repr(result.error),
            rows=[
                {
                    "ticker": row.ticker,
                    "price": str(row.price),
                    "ts": row.ts,
                    **({"in_doubt": True} if (row.ticker, row.ts) in result.in_doubt else {}),
                }
                for row in lost
            ],
        )
    return lost
