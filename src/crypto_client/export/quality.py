"""The data-quality figures of one UTC day of a ticker's rows: what `/quality` answers and the
lake's manifest carries, computed exactly (decimal arithmetic) from the rows themselves."""

import datetime
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pyarrow as pa

from crypto_client.coverage import expected_window
from crypto_client.domain import DAY_SECONDS, MAX_TS
from crypto_client.export.parquet import SCHEMA, OpenReader, tables

MINUTE = 60
# Where Deribit's own figures come from, against which a polled price is compared.
_OTHER_SOURCES = ("backfill", "trade")


def day_name(day_start: int) -> str:
    return datetime.datetime.fromtimestamp(day_start, datetime.UTC).date().isoformat()


@dataclass(frozen=True, slots=True)
class Observation:
    ts: int
    price: Decimal


def _jump(previous: Observation, current: Observation) -> dict[str, Any]:
    change = current.price - previous.price
    return {
        "ts": current.ts,
        "previous_ts": previous.ts,
        "previous_price": previous.price,
        "price": current.price,
        "change": change,
        "relative": float(change / previous.price),
    }


def _ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole, 6)


def measure_day(
    table: pa.Table,
    day_start: int,
    interval: int,
    expected: tuple[int, int] | None,
    previous: Observation | None,
) -> dict[str, Any]:
    """The figures of the day starting at `day_start`, from its rows (`table`, oldest first,
    columns `ts`, `price_text`, `source`); `expected` is the first and last expected slot of
    the day (None: none), `previous` the last row before the day (for the first jump)."""
    timestamps = table.column("ts").to_pylist()
    prices = [Decimal(text) for text in table.column("price_text").to_pylist()]
    sources = [str(source) for source in table.column("source").to_pylist()]
    first_slot, last_slot = expected if expected is not None else (0, -interval)
    slot_sources: dict[int, str] = {}
    minutes: dict[int, tuple[list[Decimal], list[tuple[Decimal, str]]]] = {}
    largest_absolute: tuple[Decimal, dict[str, Any]] | None = None
    largest_relative: tuple[Decimal, dict[str, Any]] | None = None
    for ts, price, source in zip(timestamps, prices, sources, strict=True):
        slot = ts - ts % interval
        if first_slot <= slot <= last_slot:
            slot_sources.setdefault(slot, source)
        polled, others = minutes.setdefault(ts - ts % MINUTE, ([], []))
        if source == "poll":
            polled.append(price)
        elif source in _OTHER_SOURCES:
            others.append((price, source))
        current = Observation(ts, price)
        if previous is not None:
            change = abs(price - previous.price)
            if largest_absolute is None or change > largest_absolute[0]:
                largest_absolute = (change, _jump(previous, current))
            relative = change / previous.price
            if largest_relative is None or relative > largest_relative[0]:
                largest_relative = (relative, _jump(previous, current))
        previous = current
    expected_slots = (last_slot - first_slot) // interval + 1
    stored: dict[str, int] = {}
    for source in slot_sources.values():
        stored[source] = stored.get(source, 0) + 1
    stored_total = len(slot_sources)
    return {
        "day": day_name(day_start),
        "from_ts": day_start,
        "expected_slots": expected_slots,
        "stored_slots": stored,
        "missing_slots": expected_slots - stored_total,
        "completeness": _ratio(stored_total, expected_slots),
        "rows": len(timestamps),
        "first_ts": timestamps[0] if timestamps else None,
        "last_ts": timestamps[-1] if timestamps else None,
        "longest_gap": _longest_gap(sorted(slot_sources), first_slot, last_slot, interval),
        "largest_absolute_jump": None if largest_absolute is None else largest_absolute[1],
        "largest_relative_jump": None if largest_relative is None else largest_relative[1],
        "largest_source_difference": _largest_difference(minutes),
    }


def _longest_gap(stored: list[int], first_slot: int, last_slot: int, interval: int) -> dict[str, int] | None:
    """The longest run of expected slots without a row (the earliest of equal ones)."""
    best: tuple[int, int] | None = None
    cursor = first_slot
    for slot in [*stored, last_slot + interval]:
        if slot > cursor and (best is None or slot - cursor > best[1] - best[0]):
            best = (cursor, slot)
        cursor = slot + interval
    if best is None:
        return None
    return {"from_ts": best[0], "to_ts": best[1] - 1, "slots": (best[1] - best[0]) // interval}


def _largest_difference(
    minutes: dict[int, tuple[list[Decimal], list[tuple[Decimal, str]]]],
) -> dict[str, Any] | None:
    best: dict[str, Any] | None = None
    for minute, (polled, others) in minutes.items():
        for poll in polled:
            for other, source in others:
                difference = abs(poll - other)
                if best is None or difference > best["difference"]:
                    best = {
                        "minute_ts": minute,
                        "poll": poll,
                        "other": other,
                        "other_source": source,
                        "difference": difference,
                    }
    return best


def day_bounds(day_start: int, lower: int, upper: int) -> tuple[int, int]:
    """The part of the day starting at `day_start` within `lower..upper`."""
    return max(day_start, lower), min(day_start + DAY_SECONDS - 1, upper)


def expected_in_day(window: tuple[int, int] | None, day_start: int, interval: int) -> tuple[int, int] | None:
    """The expected slots of `window` (first and last slot) that start in the day."""
    if window is None:
        return None
    first = max(window[0], day_start)
    last = min(window[1], day_start + DAY_SECONDS - interval)
    return (first, last) if first <= last else None


@dataclass(frozen=True, slots=True)
class Span:
    """What a report over `lower..upper` covers: its expected slots and its UTC days."""

    window: tuple[int, int] | None  # the first and last expected slot
    first_day: int | None  # None: no day to report
    last_day: int
    last_row_ts: int | None  # the newest row within the bounds


async def span_of(
    open_reader: OpenReader, ticker: str, interval: int, lower: int, upper: int, now: float
) -> Span:
    """Slots are expected from the earlier of the slot tracking began in and the first stored
    row (history back-filled before tracking counts) up to the last completed slot."""
    async with open_reader() as reader:
        since = await reader.tracked_since(ticker)
        first_row = await reader.first_ts(ticker, 0, MAX_TS)
        first_in = await reader.first_ts(ticker, lower, upper)
        last_in = (await reader.at(ticker, upper)) if first_in is not None else None
    starts = [
        slot
        for slot in (since, None if first_row is None else first_row - first_row % interval)
        if slot is not None
    ]
    window = expected_window(
        min(starts) if starts else None,
        interval,
        from_ts=lower,
        to_ts=None if upper == MAX_TS else upper,
        now=now,
    )
    firsts = [ts for ts in (first_in, None if window is None else window[0]) if ts is not None]
    lasts = [
        ts
        for ts in (None if last_in is None else last_in.ts, None if window is None else window[1])
        if ts is not None
    ]
    last_row_ts = None if last_in is None else last_in.ts
    if not firsts:
        return Span(window, None, 0, last_row_ts)
    first = max(lower, min(firsts))
    last = min(upper, max(lasts))
    return Span(window, first - first % DAY_SECONDS, last - last % DAY_SECONDS, last_row_ts)


async def day_rows(open_reader: OpenReader, ticker: str, lower: int, upper: int) -> pa.Table:
    found = [table async for table in tables(open_reader, ticker, lower, upper)]
    return pa.concat_tables(found) if found else SCHEMA.empty_table()


async def report_day(
    open_reader: OpenReader, ticker: str, interval: int, span: Span, day_start: int, lower: int, upper: int
) -> tuple[pa.Table, dict[str, Any]]:
    """The rows of the day starting at `day_start` within `lower..upper`, and their figures."""
    first, last = day_bounds(day_start, lower, upper)
    rows = await day_rows(open_reader, ticker, first, last)
    async with open_reader() as reader:
        before = await reader.at(ticker, first - 1) if first > 0 else None
    previous = None if before is None else Observation(before.ts, before.price)
    expected = expected_in_day(span.window, day_start, interval)
    return rows, measure_day(rows, day_start, interval, expected, previous)
