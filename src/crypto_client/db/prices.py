"""Reads of stored prices: the newest, as of a moment, several at once, and what is stored.
Each is one walk of the `(ticker, ts)` primary-key index, but `ticker_stats` (counts rows)."""

from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import BigInteger, String, bindparam, exists, func, literal, or_, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.tables import PRICE_ROW_COLUMNS, price_ticks, tracked_tickers
from crypto_client.domain import MAX_TS, PriceRow

_c = price_ticks.c


class TickerStats(NamedTuple):
    ticker: str
    rows: int
    first_ts: int
    last_ts: int


# A loose index scan: each step seeks the next ticker after the previous one.
_walk = select(func.min(_c.ticker).label("ticker")).cte("tickers", recursive=True)
_after = select(func.min(_c.ticker)).where(_c.ticker > _walk.c.ticker).correlate(_walk).scalar_subquery()
_walk = _walk.union_all(select(_after.label("ticker")).where(_walk.c.ticker.is_not(None)))


class PriceReads:
    """Part of `PriceReader`. Statements are built once: every request reuses the compiled
    statement (and, on PostgreSQL, the prepared one)."""

    _connection: AsyncConnection

    LATEST = (
        select(*PRICE_ROW_COLUMNS)
        .where(
            _c.ticker == bindparam("ticker", type_=String), _c.ts <= bindparam("not_after", type_=BigInteger)
        )
        .order_by(_c.ts.desc())
        .limit(1)
    )

    async def latest(self, ticker: str, *, not_after: int = MAX_TS) -> PriceRow | None:
        """The row with the largest `ts` up to `not_after` (one index seek): a bound below
        MAX_TS keeps rows dated in the future from passing for the newest price."""
        row = (
            await self._connection.execute(self.LATEST, {"ticker": ticker, "not_after": not_after})
        ).first()
        return None if row is None else PriceRow._make(row)

    _KNOWN = select(
        or_(
            exists().where(_c.ticker == bindparam("ticker", type_=String)),
            exists().where(tracked_tickers.c.ticker == bindparam("ticker", type_=String)),
        )
    )

    async def is_known(self, ticker: str) -> bool:
        """Whether `ticker` has rows or is tracked (two index seeks)."""
        return bool(await self._connection.scalar(self._KNOWN, {"ticker": ticker}))

    AT = (
        select(*PRICE_ROW_COLUMNS)
        .where(_c.ticker == bindparam("ticker", type_=String), _c.ts <= bindparam("ts", type_=BigInteger))
        .order_by(_c.ts.desc())
        .limit(1)
    )

    async def at(self, ticker: str, ts: int) -> PriceRow | None:
        """The last row at or before `ts`: one index seek."""
        row = (await self._connection.execute(self.AT, {"ticker": ticker, "ts": ts})).first()
        return None if row is None else PriceRow._make(row)

    async def latest_of(self, tickers: Sequence[str], *, not_after: int = MAX_TS) -> dict[str, PriceRow]:
        """The latest row of each ticker up to `not_after` (as `latest`), in one statement
        (an index seek per ticker)."""
        if not tickers:
            return {}
        # Each part is wrapped in a subquery: SQLite allows no LIMIT on a bare UNION member.
        newest = [
            select(*PRICE_ROW_COLUMNS)
            .where(_c.ticker == literal(ticker, String), _c.ts <= literal(not_after, BigInteger))
            .order_by(_c.ts.desc())
            .limit(1)
            .subquery()
            for ticker in tickers
        ]
        result = await self._connection.execute(union_all(*(select(*part.c) for part in newest)))
        return {row[0]: PriceRow._make(row) for row in result}

    _FIRST_TS = select(func.min(_c.ts)).where(
        _c.ticker == bindparam("ticker", type_=String),
        _c.ts.between(bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)),
    )

    async def first_ts(self, ticker: str, lower: int, upper: int) -> int | None:
        """The time of the first row in `lower..upper` (one index seek)."""
        found = await self._connection.scalar(
            self._FIRST_TS, {"ticker": ticker, "lower": lower, "upper": upper}
        )
        return None if found is None else int(found)

    _STORED_TICKERS = select(_walk.c.ticker).where(_walk.c.ticker.is_not(None))

    async def stored_tickers(self) -> list[str]:
        """Every ticker with rows, by skipping through the primary-key index (one seek per
        ticker, not a scan)."""
        return list(await self._connection.scalars(self._STORED_TICKERS))

    _TICKER_STATS = (
        select(_c.ticker, func.count(), func.min(_c.ts), func.max(_c.ts))
        .group_by(_c.ticker)
        .order_by(_c.ticker)
    )

    async def ticker_stats(self) -> list[TickerStats]:
        result = await self._connection.execute(self._TICKER_STATS)
        return [TickerStats._make(row) for row in result]
