"""Trade back-fill: missing slots filled from the first trade inside them.

Every Deribit trade carries `index_price`, the index at that moment. For a missing slot, the
first trade of any instrument whose `price_index` is the ticker (expired ones included) gives
the row: its time (ms truncated to seconds) as `ts`, its `index_price` exactly as the price,
`source = 'trade'`. A slot no trade falls into is recorded `no_trade_in_slot`.

Work goes UTC day by UTC day. A day's rows, its ledger entries and its checkpoint are one
transaction: a run killed at any moment leaves whole days, and the next run skips them. A
day's trades are streamed page by page (skipping from each slot's first trade to the next
missing slot), so memory holds one day whatever the span.
"""

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.trade_source import Instrument, Trade, TradeHistorySource
from crypto_client.coverage import expected_window
from crypto_client.db.reader import PriceReader
from crypto_client.db.trade_backfill import TradeBackfillCheckpoints
from crypto_client.db.writer import write_transaction
from crypto_client.domain import DAY_SECONDS, NewPrice, SlotFailure, canonical_price
from crypto_client.ingestion.backfill import repairable_until

log = structlog.get_logger(__name__)

_SPANS_PER_QUERY = 10_000


@dataclass(slots=True)
class TradeBackfillReport:
    ticker: str
    days: int = 0  # days of the span
    days_done_before: int = 0  # settled by an earlier run: skipped
    missing: int = 0  # missing slots examined
    filled: int = 0
    no_trade: int = 0
    requests: int = 0
    instruments: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# (ticker, days finished, days in all, slots filled so far) after every day.
ProgressCallback = Callable[[str, int, int, int], None]


async def trade_backfill(
    engine: AsyncEngine,
    client: TradeHistorySource,
    tickers: Sequence[str],
    *,
    interval_seconds: int,
    pending_write_seconds: float,
    from_ts: int | None,
    to_ts: int | None,
    extend_tracking: bool = False,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    now: float | None = None,
) -> list[TradeBackfillReport]:
    """Fill the missing slots of `tickers` in the bounds from trades, leaving the slots whose
    writes may still be pending (as `backfill` does). `extend_tracking` makes coverage expect
    the tickers from `from_ts` on (a back-fill into the past)."""
    moment = time.time() if now is None else now
    to_ts = repairable_until(moment, pending_write_seconds, interval_seconds, to_ts)
    if extend_tracking and from_ts is not None and not dry_run:
        async with engine.begin() as connection:
            first_slot = -(-from_ts // interval_seconds) * interval_seconds
            await TradeBackfillCheckpoints(connection).track_from(tickers, first_slot)
    reports = []
    for ticker in tickers:
        report = TradeBackfillReport(ticker)
        requests_before = client.requests
        try:
            await _backfill_ticker(
                engine, client, report, interval_seconds, from_ts, to_ts, moment, dry_run, progress
            )
        except Exception as exc:
            # Retried already; what is done is checkpointed, a rerun continues from there.
            report.error = str(exc) or repr(exc)
            log.error("trade backfill failed", ticker=ticker, error=report.error)
        report.requests = client.requests - requests_before
        log.info(
            "trade backfill finished",
            ticker=ticker,
            days=report.days,
            days_done_before=report.days_done_before,
            missing=report.missing,
            filled=report.filled,
            no_trade_in_slot=report.no_trade,
            requests=report.requests,
            dry_run=dry_run,
        )
        reports.append(report)
    return reports


async def _backfill_ticker(
    engine: AsyncEngine,
    client: TradeHistorySource,
    report: TradeBackfillReport,
    interval: int,
    from_ts: int | None,
    to_ts: int | None,
    now: float,
    dry_run: bool,
    progress: ProgressCallback | None,
) -> None:
    ticker = report.ticker
    async with engine.connect() as connection:
        since = await PriceReader(connection).tracked_since(ticker)
        if since is None and dry_run and from_ts is not None:
            since = -(-from_ts // interval) * interval  # as the real run would track it
        window = expected_window(since, interval, from_ts=from_ts, to_ts=to_ts, now=now)
        if window is None:
            return
        first, last = window
        first_day, last_day = first - first % DAY_SECONDS, last - last % DAY_SECONDS
        done = await TradeBackfillCheckpoints(connection).done_days(ticker, interval, first_day, last_day)
    instruments = await client.instruments_of(ticker)
    report.instruments = [i.instrument_name for i in instruments]
    days = range(first_day, last_day + 1, DAY_SECONDS)
    report.days, report.days_done_before = len(days), len(done)
    for finished, day in enumerate(days, start=1):
        if day not in done:
            lower, upper = max(first, day), min(last, day + DAY_SECONDS - interval)
            whole_day = lower == day and upper == day + DAY_SECONDS - interval
            await _backfill_day(
                engine, client, report, instruments, interval, lower, upper, now, whole_day, dry_run
            )
        if progress is not None:
            progress(ticker, finished, len(days), report.filled)


async def _backfill_day(
    engine: AsyncEngine,
    client: TradeHistorySource,
    report: TradeBackfillReport,
    instruments: Sequence[Instrument],
    interval: int,
    lower: int,
    upper: int,
    now: float,
    whole_day: bool,
    dry_run: bool,
) -> None:
    ticker = report.ticker
    async with engine.connect() as connection:
        reader = PriceReader(connection)
        missing = await _missing_slots(reader, ticker, lower, upper, interval)
        earlier = {f.slot_ts: f for f in await reader.slot_failures(ticker, lower, upper)} if missing else {}
    report.missing += len(missing)
    if dry_run:
        report.filled += len(missing)  # at most: which slots have a trade is known only by asking
        return
    first_trades: dict[int, Trade] = {}
    trading = [
        i
        for i in instruments
        if i.creation_timestamp <= (upper + interval) * 1000 and i.expiration_timestamp >= lower * 1000
    ]
    if missing:
        for instrument in trading:
            await _first_trades(client, instrument, missing, interval, now, first_trades)
    rows, unfilled = [], []
    for slot in missing:
        trade = first_trades.get(slot)
        price = None
        if trade is not None:
            try:
                price = canonical_price(trade.index_price)
            except ValueError:
                price = None  # a price this service cannot store is no observation
        if trade is not None and price is not None:
            rows.append(NewPrice(ticker, price, trade.timestamp // 1000, slot, "trade"))
            continue
        before = earlier.get(slot)
        why = f"{before.reason}: {before.detail}; " if before and before.reason != "no_trade_in_slot" else ""
        unfilled.append(
            SlotFailure(
                ticker,
                slot,
                "no_trade_in_slot",
                f"{why}no trade inside the slot; sources tried: trades of {len(trading)} instruments "
                f"of {ticker} ({', '.join(i.instrument_name for i in trading) or 'none listed'})",
            )
        )
    async with write_transaction(engine) as writer:
        filled = len(await writer.insert_many(rows))
        await writer.record_failures(unfilled)
        if whole_day and upper + interval <= now:
            await TradeBackfillCheckpoints(writer.connection).mark_done(
                ticker, interval, lower, filled=filled, no_trade=len(unfilled)
            )
    report.filled += filled
    report.no_trade += len(unfilled)
    metrics.BACKFILLED_ROWS.labels(metrics.ticker_label(ticker)).inc(filled)


async def _first_trades(
    client: TradeHistorySource,
    instrument: Instrument,
    missing: Sequence[int],
    interval: int,
    now: float,
    first_trades: dict[int, Trade],
) -> None:
    """Record in `first_trades` the instrument's first trade in each missing slot where it is
    earlier than any found so far, reading only from one missing slot to the next."""
    wanted = set(missing)
    ordered = list(missing)

    def next_start(last_ms: int) -> int:
        # The first missing slot after the one the last trade fell in.
        slot = last_ms // 1000 // interval * interval
        position = bisect.bisect_right(ordered, slot)
        return ordered[position] * 1000 if position < len(ordered) else (ordered[-1] + interval) * 1000

    start_ms, end_ms = missing[0] * 1000, (missing[-1] + interval) * 1000 - 1
    async for page in client.trades(
        instrument.instrument_name, start_ms, end_ms, now_ms=int(now * 1000), next_start=next_start
    ):
        for trade in page:
            slot = trade.timestamp // 1000 // interval * interval
            if slot in wanted:
                known = first_trades.get(slot)
                if known is None or trade.timestamp < known.timestamp:
                    first_trades[slot] = trade


async def _missing_slots(reader: PriceReader, ticker: str, first: int, last: int, interval: int) -> list[int]:
    slots: list[int] = []
    start: int | None = first
    while start is not None:
        spans, start = await reader.missing_spans(ticker, start, last, interval, limit=_SPANS_PER_QUERY)
        for span in spans:
            slots.extend(range(span.first_slot, span.last_slot + 1, interval))
    return slots
