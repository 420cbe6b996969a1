"""Reads of the slot ledger: since when a ticker is tracked, which slots have a row, and the
recorded reasons for the ones that do not (`PriceWriter` writes them)."""

from typing import NamedTuple, cast

from sqlalchemy import BigInteger, Integer, String, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.tables import price_ticks, slot_failures, tracked_tickers
from crypto_client.domain import GapReason, SlotFailure


class SlotSpan(NamedTuple):
    """Consecutive missing slots: the first and the last missing slot's start."""

    first_slot: int
    last_slot: int


_c = price_ticks.c
_IN_SLOTS = (
    _c.ticker == bindparam("ticker", type_=String),
    _c.slot_ts.between(bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)),
)
_steps = (
    select(_c.slot_ts, func.lag(_c.slot_ts).over(order_by=_c.slot_ts).label("previous"))
    .where(*_IN_SLOTS)
    .subquery("steps")
)


class LedgerReads:
    """Part of `PriceReader`."""

    _connection: AsyncConnection

    _TRACKED_SINCE = select(tracked_tickers.c.since_slot_ts).where(
        tracked_tickers.c.ticker == bindparam("ticker", type_=String)
    )

    async def tracked_since(self, ticker: str) -> int | None:
        since = await self._connection.scalar(self._TRACKED_SINCE, {"ticker": ticker})
        return None if since is None else int(since)

    _SLOTS_BY_SOURCE = select(_c.source, func.count()).where(*_IN_SLOTS).group_by(_c.source)

    async def stored_slots_by_source(self, ticker: str, first_slot: int, last_slot: int) -> dict[str, int]:
        """How many slots in `first_slot..last_slot` have a row, per source."""
        result = await self._connection.execute(
            self._SLOTS_BY_SOURCE, {"ticker": ticker, "lower": first_slot, "upper": last_slot}
        )
        return {str(source): int(count) for source, count in result}

    _SLOT_BOUNDS = select(func.min(_c.slot_ts), func.max(_c.slot_ts)).where(*_IN_SLOTS)
    _SLOT_STEPS = (
        select(_steps.c.previous, _steps.c.slot_ts)
        .where(_steps.c.slot_ts - _steps.c.previous > bindparam("interval", type_=BigInteger))
        .order_by(_steps.c.slot_ts)
        .limit(bindparam("limit", type_=Integer))
    )

    async def missing_spans(
        self, ticker: str, first_slot: int, last_slot: int, interval: int, *, limit: int
    ) -> tuple[list[SlotSpan], int | None]:
        """Up to `limit` runs of slots without a row in `first_slot..last_slot`, oldest first,
        and the first slot of the next run when there are more. One walk of the
        `(ticker, slot_ts)` index: each run is a step between consecutive stored slots."""
        bounds = {"ticker": ticker, "lower": first_slot, "upper": last_slot}
        low, high = (await self._connection.execute(self._SLOT_BOUNDS, bounds)).one()
        if low is None:
            return [SlotSpan(first_slot, last_slot)], None
        spans = []
        if low > first_slot:
            spans.append(SlotSpan(first_slot, low - interval))
        steps = await self._connection.execute(
            self._SLOT_STEPS, {**bounds, "interval": interval, "limit": limit + 1}
        )
        spans.extend(SlotSpan(previous + interval, current - interval) for previous, current in steps)
        if high < last_slot:
            spans.append(SlotSpan(high + interval, last_slot))
        if len(spans) > limit:
            return spans[:limit], spans[limit].first_slot
        return spans, None

    _FAILURES_IN = (
        select(slot_failures.c.slot_ts, slot_failures.c.reason, slot_failures.c.detail)
        .where(
            slot_failures.c.ticker == bindparam("ticker", type_=String),
            slot_failures.c.slot_ts.between(
                bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)
            ),
        )
        .order_by(slot_failures.c.slot_ts)
    )

    async def slot_failures(self, ticker: str, first_slot: int, last_slot: int) -> list[SlotFailure]:
        result = await self._connection.execute(
            self._FAILURES_IN, {"ticker": ticker, "lower": first_slot, "upper": last_slot}
        )
        return [SlotFailure(ticker, slot, cast(GapReason, reason), detail) for slot, reason, detail in result]
