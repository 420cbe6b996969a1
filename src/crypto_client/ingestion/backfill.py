"""Back-fill: missing slots repaired from Deribit's own history (`get_index_chart_data`).

For each missing slot within reach, the first history point whose time lies inside the slot
is stored with its own time and exact price, tagged `source = 'backfill'`. The finest range
that reaches a slot is used. A slot with no point inside it stays missing and is recorded as
`not_repairable` with the resolution that was available. Nothing is overwritten, duplicated,
or interpolated.
"""

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import pairwise

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.source import HistoryPoint, HistorySource
from crypto_client.coverage import expected_window
from crypto_client.db.repository import PriceReader, write_transaction
from crypto_client.domain import NewPrice, SlotFailure, canonical_price

log = structlog.get_logger(__name__)

# At most this many missing slots are examined per ticker and run (the newest first).
MAX_SLOTS_PER_RUN = 200_000
_SPANS_PER_QUERY = 10_000


@dataclass(slots=True)
class BackfillReport:
    ticker: str
    missing: int = 0  # missing slots examined
    filled: int = 0
    not_repairable: int = 0
    ranges: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def finest_range(ranges: Mapping[str, int | None], age_seconds: float) -> str:
    """The finest history range that still reaches `age_seconds` back."""
    for name, reach in ranges.items():
        if reach is None or reach >= age_seconds:
            return name
    return list(ranges)[-1]


async def backfill(
    engine: AsyncEngine,
    history: HistorySource,
    tickers: Sequence[str],
    *,
    interval_seconds: int,
    from_ts: int | None = None,
    to_ts: int | None = None,
    dry_run: bool = False,
    retry_unrepairable: bool = True,
    now: float | None = None,
) -> list[BackfillReport]:
    """Repair the missing slots of `tickers` within the bounds (default: their tracked span).

    `retry_unrepairable=False` skips slots already recorded `not_repairable`: Deribit's
    history of a slot only coarsens with time, so asking again finds nothing new.
    """
    moment = time.time() if now is None else now
    reports = []
    for ticker in tickers:
        report = BackfillReport(ticker)
        try:
            await _backfill_ticker(
                engine,
                history,
                report,
                interval_seconds,
                from_ts,
                to_ts,
                dry_run=dry_run,
                retry_unrepairable=retry_unrepairable,
                now=moment,
            )
        except Exception as exc:
            # One ticker's failure is its own; the history fetch was retried already.
            report.error = str(exc) or repr(exc)
            log.error("backfill failed", ticker=ticker, error=report.error)
        log.info(
            "backfill finished",
            ticker=ticker,
            missing=report.missing,
            filled=report.filled,
            not_repairable=report.not_repairable,
            ranges=report.ranges,
            dry_run=dry_run,
        )
        reports.append(report)
    return reports


async def _backfill_ticker(
    engine: AsyncEngine,
    history: HistorySource,
    report: BackfillReport,
    interval: int,
    from_ts: int | None,
    to_ts: int | None,
    *,
    dry_run: bool,
    retry_unrepairable: bool,
    now: float,
) -> None:
    ticker = report.ticker
    async with engine.connect() as connection:
        reader = PriceReader(connection)
        window = expected_window(
            await reader.tracked_since(ticker), interval, from_ts=from_ts, to_ts=to_ts, now=now
        )
        if window is None:
            return
        missing = await _missing_slots(reader, ticker, *window, interval)
        known = {f.slot_ts: f for f in await reader.slot_failures(ticker, *window)}
    if not retry_unrepairable:
        missing = [slot for slot in missing if slot not in known or known[slot].reason != "not_repairable"]
    report.missing = len(missing)
    by_range: dict[str, list[int]] = {}
    for slot in missing:
        by_range.setdefault(finest_range(history.history_ranges, now - slot), []).append(slot)

    rows: list[NewPrice] = []
    unfilled: list[SlotFailure] = []
    for range_name, slots in by_range.items():
        report.ranges.append(range_name)
        points = await history.fetch_history(ticker, range_name)
        chosen = _first_point_per_slot(points, set(slots), interval)
        rows.extend(
            NewPrice(ticker, price, ts, slot, "backfill") for slot, (ts, price) in sorted(chosen.items())
        )
        resolution = _resolution(points)
        for slot in slots:
            if slot not in chosen:
                earlier = known.get(slot)
                why = (
                    f"{earlier.reason}: {earlier.detail}; "
                    if earlier and earlier.reason != "not_repairable"
                    else ""
                )
                unfilled.append(
                    SlotFailure(
                        ticker,
                        slot,
                        # Deribit has no record of the slot: the trades' verdict stands.
                        "no_trade_in_slot"
                        if earlier and earlier.reason == "no_trade_in_slot"
                        else "not_repairable",
                        f"{why}no point of Deribit's history inside the slot "
                        f"(range {range_name}, points about {resolution} apart)",
                    )
                )
    report.not_repairable = len(unfilled)
    if dry_run:
        report.filled = len(rows)
        return
    async with write_transaction(engine) as writer:
        report.filled = len(await writer.insert_many(rows))
        await writer.record_failures(unfilled)
    metrics.BACKFILLED_ROWS.labels(metrics.ticker_label(ticker)).inc(report.filled)


async def _missing_slots(reader: PriceReader, ticker: str, first: int, last: int, interval: int) -> list[int]:
    """Every missing slot in `first..last`, the newest `MAX_SLOTS_PER_RUN` of them."""
    slots: list[int] = []
    start: int | None = first
    while start is not None:
        spans, start = await reader.missing_spans(ticker, start, last, interval, limit=_SPANS_PER_QUERY)
        for span in spans:
            slots.extend(range(span.first_slot, span.last_slot + 1, interval))
    return slots[-MAX_SLOTS_PER_RUN:]


def _first_point_per_slot(
    points: Sequence[HistoryPoint], slots: set[int], interval: int
) -> dict[int, tuple[int, Decimal]]:
    chosen: dict[int, tuple[int, Decimal]] = {}
    for point in sorted(points, key=lambda p: p.ts_ms):
        ts = point.ts_ms // 1000
        slot = ts // interval * interval
        if slot in slots and slot not in chosen:
            try:
                chosen[slot] = (ts, canonical_price(point.price))
            except ValueError:
                continue  # a point this service cannot store is no point
    return chosen


def _resolution(points: Sequence[HistoryPoint]) -> str:
    if len(points) < 2:
        return "unknown (fewer than two points)"
    gaps = [b.ts_ms - a.ts_ms for a, b in pairwise(points)]
    return f"{statistics.median(gaps) / 1000:g} s"
