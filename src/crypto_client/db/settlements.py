"""Deribit's daily delivery prices (`settlement_prices`), kept apart from the index series."""

from collections.abc import Sequence
from datetime import date
from decimal import Decimal
from typing import NamedTuple

from sqlalchemy import Date, Integer, String, Table, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.models import SettlementPrice

_table: Table = SettlementPrice.__table__  # type: ignore[assignment]
_c = _table.c


class Settlement(NamedTuple):
    date: date
    delivery_price: Decimal


class SettlementPage(NamedTuple):
    rows: list[Settlement]
    next_date: date | None  # where the next page starts, when there is one


class Settlements:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def store(self, ticker: str, prices: Sequence[Settlement]) -> int:
        """Insert the prices not stored yet (a stored date is never rewritten); how many."""
        if not prices:
            return 0
        rows = [{"ticker": ticker, "date": p.date, "delivery_price": p.delivery_price} for p in prices]
        result = await self._connection.execute(_INSERT[self._connection.dialect.name], rows)
        return len(result.all())

    async def count(self, ticker: str) -> int:
        return int(await self._connection.scalar(_COUNT, {"ticker": ticker}) or 0)

    async def page(self, ticker: str, lower: date, upper: date, *, limit: int) -> SettlementPage:
        """Up to `limit` prices with `lower <= date <= upper`, oldest first."""
        result = await self._connection.execute(
            _PAGE, {"ticker": ticker, "lower": lower, "upper": upper, "limit": limit + 1}
        )
        rows = [Settlement(day, price) for day, price in result]
        if len(rows) > limit:
            return SettlementPage(rows[:limit], rows[limit].date)
        return SettlementPage(rows, None)


_INSERT = {
    "postgresql": postgresql.insert(_table).on_conflict_do_nothing().returning(_c.date),
    "sqlite": sqlite.insert(_table).on_conflict_do_nothing().returning(_c.date),
}
_COUNT = select(func.count()).where(_c.ticker == bindparam("ticker", type_=String))
_PAGE = (
    select(_c.date, _c.delivery_price)
    .where(
        _c.ticker == bindparam("ticker", type_=String),
        _c.date.between(bindparam("lower", type_=Date), bindparam("upper", type_=Date)),
    )
    .order_by(_c.date)
    .limit(bindparam("limit", type_=Integer))
)
