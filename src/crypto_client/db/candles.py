"""OHLC candles: from the rows, or merged from the hourly roll-up `price_candles_1h` (which
the database's triggers keep, revision 0007)."""

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import ClassVar, NamedTuple

from sqlalchemy import BigInteger, Integer, String, bindparam, select, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.selectable import TextualSelect

from crypto_client.db.models import ExactDecimal, sqlite_price_order
from crypto_client.db.tables import hour_candles

HOUR = 3600


class Candle(NamedTuple):
    ts: int  # the bucket's start
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    rows: int
    backfilled: int


_CANDLE_COLUMNS = {
    "ts": BigInteger,
    "open": ExactDecimal,
    "high": ExactDecimal,
    "low": ExactDecimal,
    "close": ExactDecimal,
    "rows": Integer,
    "backfilled": Integer,
}
_SQLITE_ORDER = sqlite_price_order("price")
_h = hour_candles.c


class CandleReads:
    """Part of `PriceReader`."""

    _connection: AsyncConnection

    _HOURS = (
        select(_h.bucket, _h.open, _h.high, _h.low, _h.close, _h.rows, _h.backfilled)
        .where(
            _h.ticker == bindparam("ticker", type_=String),
            _h.bucket.between(bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)),
        )
        .order_by(_h.bucket)
    )

    async def candles(self, ticker: str, size: int, origin: int, lower: int, upper: int) -> list[Candle]:
        """OHLC candles of the rows in `lower..upper`, in buckets of `size` seconds aligned
        to `origin` (UTC), oldest first; empty buckets are absent.

        Buckets made of whole hours are merged from the hourly roll-up (the hours cut by
        `lower` or `upper` from the rows), so a year of 1-minute rows is 8,760 roll-up rows."""
        if size % HOUR or origin % HOUR:
            return await self.candles_from_rows(ticker, size, origin, lower, upper)
        first_whole = -(-lower // HOUR) * HOUR
        end_whole = (upper + 1) // HOUR * HOUR  # exclusive
        if first_whole >= end_whole:
            hours = await self.candles_from_rows(ticker, HOUR, 0, lower, upper)
        else:
            hours = []
            if lower < first_whole:
                hours += await self.candles_from_rows(ticker, HOUR, 0, lower, first_whole - 1)
            result = await self._connection.execute(
                self._HOURS, {"ticker": ticker, "lower": first_whole, "upper": end_whole - HOUR}
            )
            hours += [Candle._make(row) for row in result]
            if end_whole <= upper:
                hours += await self.candles_from_rows(ticker, HOUR, 0, end_whole, upper)
        return merge_candles(hours, size, origin)

    # Typed by name: the SELECT lists below name their columns so, or prices stay SQLite's text.
    _FROM_ROWS: ClassVar[Mapping[str, TextualSelect]] = {
        # Open and close are the rows at the bucket's first and last ts: primary-key lookups.
        # A row's bucket is ts - ((ts - origin) mod size), with a modulo that is never negative.
        "postgresql": text(
            """
            WITH agg AS (
                SELECT ts - ((((ts - :origin) % :size) + :size) % :size) AS bucket,
                       min(ts) AS first_ts, max(ts) AS last_ts,
                       max(price) AS high, min(price) AS low, count(*) AS rows,
                       count(*) FILTER (WHERE source = 'backfill') AS backfilled
                FROM price_ticks WHERE ticker = :ticker AND ts BETWEEN :lower AND :upper
                GROUP BY 1)
            SELECT agg.bucket AS ts, o.price AS open, agg.high AS high, agg.low AS low,
                   c.price AS close, agg.rows AS rows, agg.backfilled AS backfilled
            FROM agg
            JOIN price_ticks o ON o.ticker = :ticker AND o.ts = agg.first_ts
            JOIN price_ticks c ON c.ticker = :ticker AND c.ts = agg.last_ts
            ORDER BY agg.bucket
            """
        ).columns(**_CANDLE_COLUMNS),
        # Prices are text on SQLite: compare them exactly by value, return the stored text (a
        # bare column beside a single max() or min() comes from that row).
        "sqlite": text(
            f"""
            WITH r AS (
                SELECT ts, price, source, ts - ((((ts - :origin) % :size) + :size) % :size) AS bucket
                FROM price_ticks WHERE ticker = :ticker AND ts BETWEEN :lower AND :upper),
            agg AS (
                SELECT bucket, min(ts) AS first_ts, max(ts) AS last_ts, count(*) AS rows,
                       sum(source = 'backfill') AS backfilled
                FROM r GROUP BY bucket),
            hi AS (SELECT bucket, max({_SQLITE_ORDER}) AS v, price FROM r GROUP BY bucket),
            lo AS (SELECT bucket, min({_SQLITE_ORDER}) AS v, price FROM r GROUP BY bucket)
            SELECT agg.bucket AS ts, o.price AS open, hi.price AS high, lo.price AS low,
                   c.price AS close, agg.rows AS rows, agg.backfilled AS backfilled
            FROM agg JOIN hi ON hi.bucket = agg.bucket JOIN lo ON lo.bucket = agg.bucket
            JOIN price_ticks o ON o.ticker = :ticker AND o.ts = agg.first_ts
            JOIN price_ticks c ON c.ticker = :ticker AND c.ts = agg.last_ts
            ORDER BY agg.bucket
            """  # noqa: S608 - a constant expression of `models`
        ).columns(**_CANDLE_COLUMNS),
    }

    async def candles_from_rows(
        self, ticker: str, size: int, origin: int, lower: int, upper: int
    ) -> list[Candle]:
        """As `candles`, always computed from the rows, never from the roll-up (which is how
        the roll-up can be checked against them)."""
        statement = self._FROM_ROWS[self._connection.dialect.name]
        parameters = {"ticker": ticker, "size": size, "origin": origin, "lower": lower, "upper": upper}
        return [Candle._make(row) for row in await self._connection.execute(statement, parameters)]


def merge_candles(candles: Sequence[Candle], size: int, origin: int) -> list[Candle]:
    """Candles of `size` seconds from shorter ones (oldest first) that divide it."""
    merged: list[Candle] = []
    for candle in candles:
        bucket = candle.ts - (candle.ts - origin) % size
        if merged and merged[-1].ts == bucket:
            last = merged[-1]
            merged[-1] = Candle(
                bucket,
                last.open,
                max(last.high, candle.high),
                min(last.low, candle.low),
                candle.close,
                last.rows + candle.rows,
                last.backfilled + candle.backfilled,
            )
        else:
            merged.append(candle._replace(ts=bucket))
    return merged
