"""The trade back-fill's checkpoints (`trade_backfill_days`) and where tracking begins."""

from collections.abc import Sequence

from sqlalchemy import BigInteger, Integer, String, Table, bindparam, case, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable

from crypto_client.db.models import TrackedTicker, TradeBackfillDay

_days: Table = TradeBackfillDay.__table__  # type: ignore[assignment]
_tracked: Table = TrackedTicker.__table__  # type: ignore[assignment]


class TradeBackfillCheckpoints:
    """Days settled by the trade back-fill. Marked in the transaction that stores the day's
    rows and ledger entries, so a killed run leaves either all of a day or none of it."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def done_days(self, ticker: str, interval: int, first_day: int, last_day: int) -> set[int]:
        result = await self._connection.scalars(
            _DONE_DAYS, {"ticker": ticker, "interval": interval, "lower": first_day, "upper": last_day}
        )
        return {int(day) for day in result}

    async def mark_done(self, ticker: str, interval: int, day: int, *, filled: int, no_trade: int) -> None:
        row = {"ticker": ticker, "interval_seconds": interval, "day_ts": day, "filled": filled}
        await self._connection.execute(_MARK[self._connection.dialect.name], [{**row, "no_trade": no_trade}])

    async def track_from(self, tickers: Sequence[str], since_slot_ts: int) -> None:
        """Expect `tickers` from `since_slot_ts` on (earlier than now tracked, or not tracked
        yet): back-filled history counts in coverage like any other."""
        if tickers:
            await self._connection.execute(
                _TRACK_FROM[self._connection.dialect.name],
                [{"ticker": ticker, "since_slot_ts": since_slot_ts} for ticker in tickers],
            )


_DONE_DAYS = select(_days.c.day_ts).where(
    _days.c.ticker == bindparam("ticker", type_=String),
    _days.c.interval_seconds == bindparam("interval", type_=Integer),
    _days.c.day_ts.between(bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)),
)


_MARK = {
    "postgresql": postgresql.insert(_days).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(_days).on_conflict_do_nothing(),
}


def _track_from(insert: postgresql.Insert | sqlite.Insert) -> Executable:
    earlier = insert.excluded.since_slot_ts < _tracked.c.since_slot_ts
    return insert.on_conflict_do_update(
        index_elements=[_tracked.c.ticker],
        set_={
            "since_slot_ts": case((earlier, insert.excluded.since_slot_ts), else_=_tracked.c.since_slot_ts)
        },
    )


_TRACK_FROM = {
    "postgresql": _track_from(postgresql.insert(_tracked)),
    "sqlite": _track_from(sqlite.insert(_tracked)),
}
