"""All SQL of the service. The API reads through `PriceReader`, ingestion writes through
`PriceWriter`; neither builds a query of its own."""

from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import BigInteger, Integer, String, Table, bindparam, func, literal, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.models import PriceTick
from crypto_client.domain import MAX_TS, NewPrice, PriceRow

_table: Table = PriceTick.__table__  # type: ignore[assignment]
_c = _table.c


class JsonPage(NamedTuple):
    json: str  # a JSON array of price objects (the fields of PriceRow), oldest first
    rows: int
    next_ts: int | None  # where the next page starts, when there is one


class TickerStats(NamedTuple):
    ticker: str
    rows: int
    first_ts: int
    last_ts: int


class PriceReader:
    """Read-only queries. All but `ticker_stats` (which counts rows) are one walk of the
    `(ticker, ts)` primary-key index."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def ping(self) -> None:
        await self._connection.execute(select(literal(1)))

    async def latest(self, ticker: str) -> PriceRow | None:
        row = (await self._connection.execute(_LATEST, {"ticker": ticker})).first()
        return None if row is None else PriceRow._make(row)

    async def page_json(
        self,
        ticker: str,
        *,
        limit: int,
        offset: int = 0,
        start_ts: int | None = None,
        from_ts: int | None = None,
        to_ts: int | None = None,
    ) -> JsonPage:
        """Up to `limit` rows oldest first with `from_ts <= ts <= to_ts` and `ts >= start_ts`,
        rendered by the database as a JSON array of price objects.

        The database writes the JSON because that is several times faster than turning each
        row into Python objects and back; prices keep their exact decimal text. `start_ts` is
        the keyset cursor: one index seek at any depth, where `offset` reads and discards
        every row before the page.
        """
        lower = max(0 if from_ts is None else from_ts, 0 if start_ts is None else start_ts)
        upper = MAX_TS if to_ts is None else to_ts
        statement = _PAGE_JSON[self._connection.dialect.name]
        parameters = {"ticker": ticker, "lower": lower, "upper": upper, "limit": limit + 1, "offset": offset}
        objects, rows, last_ts = (await self._connection.execute(statement, parameters)).one()
        if rows <= limit:
            return JsonPage(f"[{objects or ''}]", rows, None)
        # One row more than asked says a next page exists and where it starts.
        cut = objects.rfind(_ROW_SEPARATOR)
        return JsonPage(f"[{objects[:cut]}]", limit, last_ts)

    async def ticker_stats(self) -> list[TickerStats]:
        query = (
            select(_c.ticker, func.count(), func.min(_c.ts), func.max(_c.ts))
            .group_by(_c.ticker)
            .order_by(_c.ticker)
        )
        result = await self._connection.execute(query)
        return [TickerStats._make(row) for row in result]


class PriceWriter:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def insert_many(self, prices: Sequence[NewPrice]) -> list[tuple[str, int]]:
        """Insert `prices`, skipping any whose `(ticker, ts)` or `(ticker, slot_ts)` is taken.

        Returns the `(ticker, ts)` of the rows that were new. The caller owns the transaction.
        """
        if not prices:
            return []
        statement = _INSERT[self._connection.dialect.name]
        # One compiled statement, sent as multi-row VALUES batches (SQLAlchemy's insertmanyvalues).
        result = await self._connection.execute(statement, [price._asdict() for price in prices])
        return [(ticker, ts) for ticker, ts in result]


# Built once: every request reuses the compiled statement (and, on PostgreSQL, the prepared one).
_ROW_COLUMNS = [_c[name] for name in PriceRow._fields]
_LATEST = (
    select(*_ROW_COLUMNS)
    .where(_c.ticker == bindparam("ticker", type_=String))
    .order_by(_c.ts.desc())
    .limit(1)
)
_PAGE_ROWS = (
    select(*_ROW_COLUMNS)
    .where(
        _c.ticker == bindparam("ticker", type_=String),
        _c.ts.between(bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)),
    )
    .order_by(_c.ts)
    .limit(bindparam("limit", type_=Integer))
    .offset(bindparam("offset", type_=Integer))
    .subquery("page")
)
# A price object per row, keys in PriceRow's order; the ticker is the only string and, being
# an index name, has nothing to escape.
_ROW_FORMAT = (
    "{"
    + ",".join(f'"{name}":"%s"' if name == "ticker" else f'"{name}":%s' for name in PriceRow._fields)
    + "}"
)
_ROW_SEPARATOR = ',{"' + PriceRow._fields[0] + '":'
_PAGE_VALUES = [_PAGE_ROWS.c[name] for name in PriceRow._fields]
_PAGE_JSON = {
    "postgresql": select(
        func.string_agg(
            func.format(_ROW_FORMAT, *_PAGE_VALUES),
            aggregate_order_by(literal_column("','"), _PAGE_ROWS.c.ts),
        ),
        func.count(),
        func.max(_PAGE_ROWS.c.ts),
    ),
    # SQLite concatenates in the order the ordered subquery yields its rows.
    "sqlite": select(
        func.group_concat(func.printf(_ROW_FORMAT, *_PAGE_VALUES), ","),
        func.count(),
        func.max(_PAGE_ROWS.c.ts),
    ),
}
_INSERT = {
    "postgresql": postgresql.insert(_table).on_conflict_do_nothing().returning(_c.ticker, _c.ts),
    "sqlite": sqlite.insert(_table).on_conflict_do_nothing().returning(_c.ticker, _c.ts),
}
