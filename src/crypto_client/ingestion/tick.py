"""One ingestion tick: fetch every ticker's price and store the tick in one transaction.

This is the only ingestion logic; the Celery task, the embedded scheduler and
`crypto-client ingest` all call `ingest_tick` (through `IngestionRuntime.run_tick`).
"""

import asyncio
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.clients.source import DeadlinePassedError, PriceSource
from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice, SlotFailure
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.outcomes import Status, TickerOutcome, count_outcomes
from crypto_client.ingestion.placement import place
from crypto_client.ingestion.storage import log_lost, store

log = structlog.get_logger(__name__)

# Ledger entries kept in memory while the database cannot take them; beyond this many the
# oldest are dropped (with a warning): their slots then show as `no_tick_ran`.
MAX_UNRECORDED_FAILURES = 100_000

# Ticks between their first write and their commit: shutdown gives these a moment to commit
# and cancels every other tick (one still fetching loses nothing by stopping) at once.
WRITING: "weakref.WeakSet[asyncio.Task[object]]" = weakref.WeakSet()


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
    # An answer after the slot's end would be refused as late: not waiting for it keeps an
    # overloaded process from running ever more overlapping ticks that can store nothing.
    slot_end = None if slot_ts is None else slot_ts + interval_seconds
    for result in await source.fetch_prices(tickers, deadline=slot_end):
        if isinstance(result.error, DeadlinePassedError):
            error = f"not answered before its slot {slot_ts}..{slot_end} ended"
            bound.warning("ticker failed", ticker=result.ticker, error=error, reason="late")
            summary.outcomes.append(TickerOutcome(result.ticker, "failed", error=error, reason="late"))
            continue
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
