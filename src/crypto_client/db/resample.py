"""The SQL of `/prices/resample`: the last observation of each bucket, with its counts by source."""

from decimal import Decimal
from typing import NamedTuple

from sqlalchemy import BigInteger, Integer, text
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.models import ExactDecimal


class Bucket(NamedTuple):
    ts: int  # the bucket's start
    price: Decimal  # the price of the bucket's last row by ts
    rows: int
    backfilled: int
    trade: int


class ResampleReader:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def buckets(self, ticker: str, size: int, origin: int, lower: int, upper: int) -> list[Bucket]:
        """The non-empty buckets of `size` seconds (aligned to `origin`) of the rows in
        `lower..upper`, oldest first: one walk of the primary key, one lookup per bucket."""
        parameters = {"ticker": ticker, "size": size, "origin": origin, "lower": lower, "upper": upper}
        return [Bucket._make(row) for row in await self._connection.execute(_BUCKETS, parameters)]


# A row's bucket is ts - ((ts - origin) mod size), with a modulo that is never negative; the
# same text runs on PostgreSQL and SQLite (integer arithmetic, CASE counts).
_BUCKETS = text(
    """
    WITH agg AS (
        SELECT ts - ((((ts - :origin) % :size) + :size) % :size) AS bucket,
               max(ts) AS last_ts, count(*) AS rows,
               sum(CASE WHEN source = 'backfill' THEN 1 ELSE 0 END) AS backfilled,
               sum(CASE WHEN source = 'trade' THEN 1 ELSE 0 END) AS trade
        FROM price_ticks WHERE ticker = :ticker AND ts BETWEEN :lower AND :upper
        GROUP BY 1)
    SELECT agg.bucket AS ts, c.price AS price, agg.rows AS rows,
           agg.backfilled AS backfilled, agg.trade AS trade
    FROM agg JOIN price_ticks c ON c.ticker = :ticker AND c.ts = agg.last_ts
    ORDER BY agg.bucket
    """
).columns(ts=BigInteger, price=ExactDecimal, rows=Integer, backfilled=Integer, trade=Integer)
