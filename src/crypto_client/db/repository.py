"""All SQL of the service. The API reads through `PriceReader`, ingestion writes through
`PriceWriter`; neither builds a query of its own."""

from collections.abc import Sequence
from decimal import Decimal
from typing import NamedTuple

from sqlalchemy import Select, Table, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.models import PriceTick

_table: Table = PriceTick.__table__  # type: ignore[assignment]
_c = _table.c

# Well under the bind-parameter limits of asyncpg (32767) and SQLite (32766), four per row.
_INSERT_CHUNK_ROWS = 2000


class Tick(NamedTuple):
    ticker: str
    price: Decimal
    ts: int


class NewTick(NamedTuple):
    ticker: str
    price: Decimal
    ts: int
    slot_ts: int | None = None


class TickerStats(NamedTuple):
    ticker: str
    rows: int
    first_ts: int
    last_ts: int


class PriceReader:
    """Read-only queries; every one is served by the `(ticker, ts)` primary key."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def ping(self) -> None:
        await self._connection.execute(select(literal(1)))

    async def latest(self, ticker: str) -> Tick | None:
        query = _ticks(ticker).order_by(_c.ts.desc()).limit(1)
        row = (await self._connection.execute(query)).first()
        return None if row is None else Tick._make(row)

    async def page(
        self,
        ticker: str,
        *,
        limit: int,
        offset: int = 0,
        after_ts: int | None = None,
        from_ts: int | None = None,
        to_ts: int | None = None,
    ) -> list[Tick]:
        """Up to `limit` rows oldest first, with `from_ts <= ts <= to_ts` and `ts > after_ts`.

        `after_ts` is the keyset cursor: it costs one index seek at any depth, where `offset`
        reads and discards every row before the page.
        """
        query = _ticks(ticker)
        if from_ts is not None:
            query = query.where(_c.ts >= from_ts)
        if to_ts is not None:
            query = query.where(_c.ts <= to_ts)
        if after_ts is not None:
            query = query.where(_c.ts > after_ts)
        query = query.order_by(_c.ts).limit(limit)
        if offset:
            query = query.offset(offset)
        result = await self._connection.execute(query)
        return [Tick._make(row) for row in result]

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

    async def insert_many(self, ticks: Sequence[NewTick]) -> list[tuple[str, int]]:
        """Insert `ticks`, skipping any whose `(ticker, ts)` or `(ticker, slot_ts)` is taken.

        Returns the `(ticker, ts)` of the rows that were new. The caller owns the transaction.
        """
        insert = postgresql.insert if self._connection.dialect.name == "postgresql" else sqlite.insert
        inserted: list[tuple[str, int]] = []
        for start in range(0, len(ticks), _INSERT_CHUNK_ROWS):
            chunk = ticks[start : start + _INSERT_CHUNK_ROWS]
            statement = (
                insert(_table)
                .values([tick._asdict() for tick in chunk])
                .on_conflict_do_nothing()
                .returning(_c.ticker, _c.ts)
            )
            result = await self._connection.execute(statement)
            inserted.extend((ticker, ts) for ticker, ts in result)
        return inserted


def _ticks(ticker: str) -> Select[tuple[str, Decimal, int]]:
    return select(_c.ticker, _c.price, _c.ts).where(_c.ticker == ticker)
