"""Back-fill: missing slots repaired from Deribit's own history (`get_index_chart_data`).

For each missing slot within reach, the first history point whose time lies inside the slot
is stored with its own time and exact price, tagged `source = 'backfill'`. The finest range
that reaches a slot is used. Nothing is overwritten, duplicated, or interpolated.

A slot's observation wins over history: a slot is repaired only once its end lies
`pending_write_seconds` in the past, the longest a polled or streamed price may still wait
in some process's memory to be written (see `IngestionRuntime.pending_write_seconds`).

A slot the history cannot reach (older than it keeps, or inside it only with points farther
apart than the slot) is recorded `not_repairable`, for good: the history only coarsens. A
slot the answer does not say anything about (it was empty, did not reach the slot, or has a
hole there) is recorded `history_unavailable` with its attempts and the time of its next try:
the automatic repair tries it again then, backing off (the wait after the k-th attempt is
`retry_backoff_seconds * 2^(k-1)`), for at most `MAX_AUTOMATIC_ATTEMPTS` attempts.
"""

import math
import re
import statistics
import time
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import cached_property
from itertools import pairwise

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client import metrics
from crypto_client.clients.source import HistoryPoint, HistorySource
from crypto_client.coverage import expected_window
from crypto_client.db.reader import PriceReader
from crypto_client.db.writer import write_transaction
from crypto_client.domain import GapReason, NewPrice, SlotFailure, canonical_price

log = structlog.get_logger(__name__)

# At most this many missing slots are examined per ticker and run (the newest first).
MAX_SLOTS_PER_RUN = 200_000
_SPANS_PER_QUERY = 10_000
# The automatic repair gives a `history_unavailable` slot this many attempts; by hand
# (`crypto-client backfill`) every missing slot is tried.
MAX_AUTOMATIC_ATTEMPTS = 12
# Points this many times farther apart than usual around a slot are a hole in the answer,
# not the history's resolution.
_HOLE_FACTOR = 2
_ISO = "%Y-%m-%dT%H:%M:%SZ"
_RETRY = re.compile(r"^attempt (\d+), (?:retried after (\S+)|not retried automatically): ")
_BEFORE = "; before: "


@dataclass(slots=True)
class BackfillReport:
    ticker: str
    missing: int = 0  # missing slots examined
    filled: int = 0
    not_repairable: int = 0
    history_unavailable: int = 0  # to be tried again
    ranges: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class _Rules:
    interval: int
    retry_backoff_seconds: float
    automatic: bool
    now: float

    def due(self, earlier: SlotFailure | None) -> bool:
        """Whether the run tries a missing slot with this ledger entry."""
        if not self.automatic or earlier is None:
            return True
        if earlier.reason == "not_repairable":
            return False
        if earlier.reason != "history_unavailable":
            return True
        attempts, retry_at = _retry(earlier)
        # An entry without the count (written by hand, or by an older version) is tried.
        return attempts == 0 or (retry_at is not None and self.now >= retry_at)

    def retry_at(self, attempts: int) -> float | None:
        """When the automatic repair tries a slot again after `attempts` that found no
        history: the wait doubles from one attempt to the next, up to the last attempt."""
        if attempts >= MAX_AUTOMATIC_ATTEMPTS or not self.retry_backoff_seconds:
            return None
        return self.now + self.retry_backoff_seconds * (1 << (attempts - 1))


def _retry(failure: SlotFailure) -> tuple[int, float | None]:
    """The attempts and the next retry's time that a `history_unavailable` entry records at
    the start of its detail (the ledger is the repair's only memory between runs)."""
    found = _RETRY.match(failure.detail)
    if found is None:
        return 0, None
    retry_at = found.group(2)
    when = datetime.strptime(retry_at, _ISO).replace(tzinfo=UTC).timestamp() if retry_at else None
    return int(found.group(1)), when


def finest_range(ranges: Mapping[str, int | None], age_seconds: float) -> str:
    """The finest history range that still reaches `age_seconds` back."""
    for name, reach in ranges.items():
        if reach is None or reach >= age_seconds:
            return name
    return list(ranges)[-1]


def repairable_until(
    moment: float, pending_write_seconds: float, interval_seconds: int, to_ts: int | None
) -> int:
    """The newest slot start a repair may fill, from any history: `to_ts` at most, and only a
    slot that ended `pending_write_seconds` before `moment` (its observation may still come)."""
    newest = int(moment - pending_write_seconds) - interval_seconds
    return newest if to_ts is None else min(to_ts, newest)


async def backfill(
    engine: AsyncEngine,
    history: HistorySource,
    tickers: Sequence[str],
    *,
    interval_seconds: int,
    pending_write_seconds: float,
    retry_backoff_seconds: float,
    from_ts: int | None = None,
    to_ts: int | None = None,
    dry_run: bool = False,
    automatic: bool = False,
    now: float | None = None,
) -> list[BackfillReport]:
    """Repair the missing slots of `tickers` within the bounds (default: their tracked span)
    whose end lies `pending_write_seconds` in the past.

    `automatic` is the automatic repair's rule: skip `not_repairable` slots, and retry a
    `history_unavailable` one only when its backoff (`retry_backoff_seconds`, doubling) is
    over. By hand, every missing slot is tried.
    """
    moment = time.time() if now is None else now
    rules = _Rules(interval_seconds, retry_backoff_seconds, automatic, moment)
    to_ts = repairable_until(moment, pending_write_seconds, interval_seconds, to_ts)
    reports = []
    for ticker in tickers:
        report = BackfillReport(ticker)
        try:
            await _backfill_ticker(engine, history, report, rules, from_ts, to_ts, dry_run=dry_run)
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
            history_unavailable=report.history_unavailable,
            ranges=report.ranges,
            dry_run=dry_run,
        )
        reports.append(report)
    return reports


async def _backfill_ticker(
    engine: AsyncEngine,
    history: HistorySource,
    report: BackfillReport,
    rules: _Rules,
    from_ts: int | None,
    to_ts: int,
    *,
    dry_run: bool,
) -> None:
    ticker = report.ticker
    interval = rules.interval
    async with engine.connect() as connection:
        reader = PriceReader(connection)
        window = expected_window(
            await reader.tracked_since(ticker), interval, from_ts=from_ts, to_ts=to_ts, now=rules.now
        )
        if window is None:
            return
        missing = await _missing_slots(reader, ticker, *window, interval)
        known = {f.slot_ts: f for f in await reader.slot_failures(ticker, *window)}
    missing = [slot for slot in missing if rules.due(known.get(slot))]
    report.missing = len(missing)
    by_range: dict[str, list[int]] = {}
    for slot in missing:
        by_range.setdefault(finest_range(history.history_ranges, rules.now - slot), []).append(slot)

    rows: list[NewPrice] = []
    unfilled: list[SlotFailure] = []
    for range_name, slots in by_range.items():
        report.ranges.append(range_name)
        answer = _Answer(
            range_name,
            history.history_ranges[range_name],
            _usable(ticker, range_name, await history.fetch_history(ticker, range_name)),
        )
        chosen = answer.first_point_per_slot(set(slots), interval)
        rows.extend(
            NewPrice(ticker, price, ts, slot, "backfill") for slot, (ts, price) in sorted(chosen.items())
        )
        for slot in slots:
            if slot not in chosen:
                unfilled.append(_unfilled(ticker, slot, known.get(slot), answer, rules))
    report.not_repairable = sum(1 for f in unfilled if f.reason == "not_repairable")
    report.history_unavailable = len(unfilled) - report.not_repairable
    if dry_run:
        report.filled = len(rows)
        return
    async with write_transaction(engine) as writer:
        report.filled = len(await writer.insert_many(rows))
        await writer.record_failures(unfilled)
    metrics.BACKFILLED_ROWS.labels(metrics.ticker_label(ticker)).inc(report.filled)


def _usable(ticker: str, range_name: str, points: Sequence[HistoryPoint]) -> list[tuple[int, Decimal]]:
    """`(ts_ms, price)` of the points this service can store, oldest first."""
    usable = []
    for point in sorted(points, key=lambda p: p.ts_ms):
        try:
            usable.append((point.ts_ms, canonical_price(point.price)))
        except ValueError as exc:
            log.warning(
                "history point skipped", ticker=ticker, range=range_name, ts_ms=point.ts_ms, error=str(exc)
            )
    return usable


@dataclass(frozen=True)  # no slots: the cached properties keep their values in __dict__
class _Answer:
    """One range's answer: its usable points and what they say about a slot without one."""

    range_name: str
    reach: int | None
    points: list[tuple[int, Decimal]]

    @cached_property
    def times(self) -> list[int]:
        return [ts_ms for ts_ms, _ in self.points]

    @cached_property
    def spacing(self) -> float:
        """The usual distance between points, in ms (asked once per slot: computed once)."""
        return statistics.median(b - a for a, b in pairwise(self.times))

    def first_point_per_slot(self, slots: set[int], interval: int) -> dict[int, tuple[int, Decimal]]:
        chosen: dict[int, tuple[int, Decimal]] = {}
        for ts_ms, price in self.points:
            ts = ts_ms // 1000
            slot = ts // interval * interval
            if slot in slots and slot not in chosen:
                chosen[slot] = (ts, price)
        return chosen

    def why_unfilled(self, slot: int, now: float) -> tuple[GapReason, str]:
        """Why the answer fills no `slot`: the history cannot reach it (`not_repairable`), or
        the answer says nothing about it (`history_unavailable`)."""
        where = f"range {self.range_name}"
        if self.reach is not None and now - slot > self.reach:
            return "not_repairable", f"older than Deribit's history reaches ({where})"
        times = self.times
        if not times:
            return "history_unavailable", f"Deribit's history ({where}) answered no usable point"
        after = bisect_left(times, slot * 1000)
        if after == 0:
            return (
                "history_unavailable",
                f"Deribit's history ({where}) starts after the slot, at {_iso(times[0] / 1000)}",
            )
        if after == len(times):
            return (
                "history_unavailable",
                f"Deribit's history ({where}) ends before the slot, at {_iso(times[-1] / 1000)}",
            )
        spacing = self.spacing
        hole = times[after] - times[after - 1]
        apart = f"points about {spacing / 1000:g} s apart"
        if hole <= _HOLE_FACTOR * spacing:
            return "not_repairable", f"no point of Deribit's history inside the slot ({where}, {apart})"
        return (
            "history_unavailable",
            f"a hole of {hole / 1000:g} s in Deribit's history around the slot ({where}, {apart})",
        )


def _unfilled(
    ticker: str, slot: int, earlier: SlotFailure | None, answer: _Answer, rules: _Rules
) -> SlotFailure:
    """The ledger entry of a slot the answer did not fill, keeping why it went missing."""
    reason, finding = answer.why_unfilled(slot, rules.now)
    cause = ""
    if earlier is not None and earlier.reason == "history_unavailable":
        cause = earlier.detail.partition(_BEFORE)[2]
    elif earlier is not None and earlier.reason != "not_repairable":
        cause = f"{earlier.reason}: {earlier.detail}"
    if reason == "not_repairable":
        # Deribit has no record of the slot: the trades' verdict stands.
        kept = "no_trade_in_slot" if earlier is not None and earlier.reason == "no_trade_in_slot" else reason
        return SlotFailure(ticker, slot, kept, f"{cause}; {finding}" if cause else finding)
    attempts = (_retry(earlier)[0] if earlier is not None and earlier.reason == reason else 0) + 1
    retry_at = rules.retry_at(attempts)
    then = "not retried automatically" if retry_at is None else f"retried after {_iso(math.ceil(retry_at))}"
    detail = f"attempt {attempts}, {then}: {finding}"
    return SlotFailure(ticker, slot, reason, f"{detail}{_BEFORE}{cause}" if cause else detail)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(_ISO)


async def _missing_slots(reader: PriceReader, ticker: str, first: int, last: int, interval: int) -> list[int]:
    """Every missing slot in `first..last`, the newest `MAX_SLOTS_PER_RUN` of them."""
    slots: list[int] = []
    start: int | None = first
    while start is not None:
        spans, start = await reader.missing_spans(ticker, start, last, interval, limit=_SPANS_PER_QUERY)
        for span in spans:
            slots.extend(range(span.first_slot, span.last_slot + 1, interval))
    return slots[-MAX_SLOTS_PER_RUN:]
