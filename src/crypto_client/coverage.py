"""Completeness of a ticker's history: expected slots, stored slots, and the gaps with why.

A tracked ticker is expected to have one row per slot from the slot it was first tracked in
up to the last completed slot. The missing ones are found from the `(ticker, slot_ts)` index
(`PriceReader.missing_spans`) and explained by the ledger; a missing slot without a ledger
entry is `no_tick_ran`.
"""

import time
from dataclasses import dataclass, field

from crypto_client.db.ledger import SlotSpan
from crypto_client.db.reader import PriceReader
from crypto_client.domain import SOURCES, GapReason, SlotFailure, current_slot


@dataclass(frozen=True, slots=True)
class Gap:
    from_ts: int  # the first missing slot's start
    to_ts: int  # the last missing second: the last missing slot's start + interval - 1
    slots: int
    reason: GapReason
    detail: str = ""


@dataclass(slots=True)
class Coverage:
    ticker: str
    interval_seconds: int
    from_ts: int | None  # the first expected slot (None: nothing expected yet)
    to_ts: int | None  # the end of the last expected slot
    expected_slots: int = 0
    stored_slots: dict[str, int] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)
    next_slot: int | None = None  # where the next page of gaps starts

    @property
    def missing_slots(self) -> int:
        return self.expected_slots - sum(self.stored_slots.values())

    @property
    def ratio(self) -> float:
        return 1.0 if self.expected_slots == 0 else 1 - self.missing_slots / self.expected_slots


def expected_window(
    since_slot: int | None, interval: int, *, from_ts: int | None, to_ts: int | None, now: float
) -> tuple[int, int] | None:
    """The first and last expected slot within the bounds, or None when there is none."""
    if since_slot is None:
        return None
    last_completed = current_slot(interval, now) - interval
    first = since_slot if from_ts is None else max(since_slot, -(-from_ts // interval) * interval)
    last = last_completed if to_ts is None else min(last_completed, current_slot(interval, to_ts))
    return (first, last) if first <= last else None


def explain(span: SlotSpan, failures: list[SlotFailure], interval: int) -> list[Gap]:
    """`span` split into runs of one reason: the ledger's where it has entries (consecutive
    slots with the same reason merge), `no_tick_ran` between them."""
    gaps: list[Gap] = []

    def add(first: int, last: int, reason: GapReason, detail: str = "") -> None:
        previous = gaps[-1] if gaps else None
        if previous is not None and previous.reason == reason and previous.to_ts + 1 == first:
            slots = previous.slots + (last - first) // interval + 1
            gaps[-1] = Gap(previous.from_ts, last + interval - 1, slots, reason, previous.detail)
        else:
            gaps.append(Gap(first, last + interval - 1, (last - first) // interval + 1, reason, detail))

    cursor = span.first_slot
    for failure in failures:
        if not span.first_slot <= failure.slot_ts <= span.last_slot:
            continue
        if failure.slot_ts > cursor:
            add(cursor, failure.slot_ts - interval, "no_tick_ran")
        add(failure.slot_ts, failure.slot_ts, failure.reason, failure.detail)
        cursor = failure.slot_ts + interval
    if cursor <= span.last_slot:
        add(cursor, span.last_slot, "no_tick_ran")
    return gaps


async def measure(
    reader: PriceReader,
    ticker: str,
    interval: int,
    *,
    from_ts: int | None = None,
    to_ts: int | None = None,
    start_slot: int | None = None,
    limit: int = 0,
    now: float | None = None,
) -> Coverage:
    """The coverage of `ticker` within the bounds, with up to `limit` runs of missing slots
    (from `start_slot` on, for paging) explained."""
    moment = time.time() if now is None else now
    window = expected_window(
        await reader.tracked_since(ticker), interval, from_ts=from_ts, to_ts=to_ts, now=moment
    )
    if window is None:
        return Coverage(ticker, interval, None, None)
    first, last = window
    counts = await reader.stored_slots_by_source(ticker, first, last)
    coverage = Coverage(
        ticker,
        interval,
        first,
        last + interval - 1,
        expected_slots=(last - first) // interval + 1,
        stored_slots={source: counts.get(source, 0) for source in SOURCES},
    )
    if limit and coverage.missing_slots:
        spans, coverage.next_slot = await reader.missing_spans(
            ticker, max(first, start_slot or first), last, interval, limit=limit
        )
        if spans:
            failures = await reader.slot_failures(ticker, spans[0].first_slot, spans[-1].last_slot)
            for span in spans:
                coverage.gaps.extend(explain(span, failures, interval))
    return coverage
