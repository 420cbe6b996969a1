"""What the database keeps true by itself (revision 0007), whoever writes: candles equal the
rows after plain SQL, COPY, UPDATE, DELETE, TRUNCATE and partition upkeep; `seq` is never
handed out twice; SQLite compares prices exactly. The writes here go through the drivers
(asyncpg, sqlite3), never through the service's repository, unless the test says so."""

import asyncio
import contextlib
import itertools
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any, cast

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.api.schemas import WEEK_ORIGIN
from crypto_client.db.candles import Candle
from crypto_client.db.engine import create_engine
from crypto_client.db.partitions import PartitionAdmin
from crypto_client.db.reader import PriceReader
from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice, Source
from crypto_client.ingestion.maintenance import month_partition, when_the_table_allows
from tests.support.databases import empty_database, plain_dsn

TICKER = "btc_usd"
# 1h, 4h, 1d, 1w: the candles the roll-up serves.
SIZES = ((3600, 0), (4 * 3600, 0), (86_400, 0), (604_800, WEEK_ORIGIN))
Row = tuple[int, Decimal, Source]  # ts, price, source


class Raw:
    """Plain SQL through the driver, `?` placeholders on both backends; each call is one
    transaction (committed, or rolled back when the statement fails)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = make_url(url).get_backend_name() == "postgresql"

    async def execute(self, sql: str, *args: Any) -> None:
        await self.executemany(sql, [args])

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.postgres:
            numbered = iter(itertools.count(1))
            statement = "".join(f"${next(numbered)}" if char == "?" else char for char in sql)
            async with self._postgres() as connection, connection.transaction():
                await connection.executemany(statement, [list(row) for row in rows])
        else:
            await asyncio.to_thread(self._sqlite, sql, [[_sqlite_value(v) for v in row] for row in rows])

    async def copy(self, rows: Sequence[Row], table: str = "price_ticks") -> None:
        async with self._postgres() as connection:
            await connection.copy_records_to_table(
                table, records=[(TICKER, *row) for row in rows], columns=["ticker", "ts", "price", "source"]
            )

    async def rows(self) -> list[Row]:
        sql = "SELECT ts, price, source FROM price_ticks WHERE ticker = 'btc_usd' ORDER BY ts"
        if self.postgres:
            async with self._postgres() as connection:
                found = await connection.fetch(sql)
        else:
            found = await asyncio.to_thread(self._sqlite_fetch, sql)
        return [(int(ts), Decimal(str(price)), cast(Source, source)) for ts, price, source in found]

    async def seqs(self) -> list[int]:
        sql = "SELECT seq FROM price_ticks ORDER BY seq"
        if self.postgres:
            async with self._postgres() as connection:
                return [int(seq) for (seq,) in await connection.fetch(sql)]
        return [int(seq) for (seq,) in await asyncio.to_thread(self._sqlite_fetch, sql)]

    @asynccontextmanager
    async def _postgres(self) -> AsyncIterator[asyncpg.Connection]:
        connection = await asyncpg.connect(plain_dsn(self.url))
        try:
            yield connection
        finally:
            await connection.close()

    def _path(self) -> str:
        database = make_url(self.url).database
        assert database is not None
        return database

    def _sqlite(self, sql: str, rows: list[list[Any]]) -> None:
        connection = sqlite3.connect(self._path())
        try:
            with connection:
                connection.executemany(sql, rows)
        finally:
            connection.close()

    def _sqlite_fetch(self, sql: str) -> list[tuple[Any, ...]]:
        connection = sqlite3.connect(self._path())
        try:
            return connection.execute(sql).fetchall()
        finally:
            connection.close()


def _sqlite_value(value: Any) -> Any:
    # The service stores SQLite prices as their plain decimal text.
    return format(value, "f") if isinstance(value, Decimal) else value


def reference(rows: Sequence[Row], size: int, origin: int) -> list[Candle]:
    """Candles straight from the rows."""
    buckets: dict[int, list[Row]] = {}
    for row in sorted(rows):
        buckets.setdefault(row[0] - (row[0] - origin) % size, []).append(row)
    return [
        Candle(
            bucket,
            members[0][1],
            max(price for _, price, _ in members),
            min(price for _, price, _ in members),
            members[-1][1],
            len(members),
            sum(source == "backfill" for _, _, source in members),
        )
        for bucket, members in sorted(buckets.items())
    ]


async def assert_candles_equal_the_rows(engine: AsyncEngine, raw: Raw, step: str) -> None:
    rows = await raw.rows()
    async with engine.connect() as connection:
        reader = PriceReader(connection)
        for size, origin in SIZES:
            served = await reader.candles(TICKER, size, origin, 0, 10**10)
            assert served == reference(rows, size, origin), f"{size} s candles after {step}"


def _rows(first: int, count: int, step: int, base: str = "43000") -> list[Row]:
    return [
        (first + n * step, Decimal(base) + Decimal(n * 37 % 101) / 10, "backfill" if n % 4 == 0 else "poll")
        for n in range(count)
    ]


_INSERT = "INSERT INTO price_ticks (ticker, ts, price, source) VALUES ('btc_usd', ?, ?, ?)"


async def test_candles_follow_rows_written_outside_the_service(engine: AsyncEngine, db_url: str) -> None:
    raw = Raw(db_url)
    async with write_transaction(engine) as writer:  # the service's own rows to begin with
        await writer.insert_many(
            [NewPrice(TICKER, price, ts, None, source) for ts, price, source in _rows(0, 50, 500)]
        )
    await raw.executemany(_INSERT, _rows(250, 50, 500, "42000"))  # between them, in the same hours
    await assert_candles_equal_the_rows(engine, raw, "INSERT")
    if raw.postgres:
        await raw.copy(_rows(100_000, 300, 97, "44000"))
        await assert_candles_equal_the_rows(engine, raw, "COPY")
    await raw.execute("UPDATE price_ticks SET price = price * 2 WHERE ts BETWEEN 0 AND 7000")
    await assert_candles_equal_the_rows(engine, raw, "UPDATE of prices")
    await raw.execute(
        "UPDATE price_ticks SET ts = ts + 1800, source = 'backfill' WHERE ts BETWEEN 9000 AND 9999"
    )
    await assert_candles_equal_the_rows(engine, raw, "UPDATE of times")
    # An hour's open, close, highest and lowest rows, and one whole hour.
    await raw.execute(
        "DELETE FROM price_ticks WHERE ts IN (0, 3250, 3500, 14250) OR ts BETWEEN 7200 AND 10799"
    )
    await assert_candles_equal_the_rows(engine, raw, "DELETE")
    await raw.execute("DELETE FROM price_ticks")
    await assert_candles_equal_the_rows(engine, raw, "DELETE of everything")


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_writes_that_name_a_partition_keep_the_roll_up(engine: AsyncEngine, db_url: str) -> None:
    """A restore or an operator may name a partition rather than the table: its statement
    triggers are its own. Creating a partition moves rows out of the default one; dropping
    one takes its hours (no trigger fires on DROP)."""
    raw = Raw(db_url)
    await raw.copy(_rows(0, 200, 61), table="price_ticks_history")
    await raw.execute("DELETE FROM price_ticks_history WHERE ts < 3600")
    await assert_candles_equal_the_rows(engine, raw, "COPY and DELETE on the history partition")
    await raw.execute("TRUNCATE price_ticks_history")
    await assert_candles_equal_the_rows(engine, raw, "TRUNCATE of a partition")

    month = month_partition(2031, 1)  # no partition yet: its rows wait in the default one
    await raw.executemany(_INSERT, _rows(month.lower + 10, 100, 301))
    done, moved = await when_the_table_allows(engine, "create", month, PartitionAdmin.create)
    assert done
    assert moved == 100
    await assert_candles_equal_the_rows(engine, raw, "creating the partition the rows moved to")
    await raw.executemany(_INSERT, _rows(month.lower + 20, 100, 301, "50000"))  # into it, through the parent
    await raw.execute(f"UPDATE {month.name} SET price = 1 WHERE ts < ?", month.lower + 3600)  # noqa: S608
    await assert_candles_equal_the_rows(engine, raw, "writes to the new partition")
    done, _ = await when_the_table_allows(engine, "drop", month, PartitionAdmin.drop)
    assert done
    await assert_candles_equal_the_rows(engine, raw, "dropping the partition")


# Prices REAL cannot tell apart (about 16 significant digits), but within the domain's bounds.
NEAR = [
    Decimal("99999999999999999998.000000000000000001"),
    Decimal("99999999999999999998.000000000000000003"),
]
NEAR += [Decimal("99999999999999999998.000000000000000002"), Decimal("99999999999999999998")]


async def test_high_and_low_are_exact_for_twenty_digit_prices(engine: AsyncEngine, db_url: str) -> None:
    raw = Raw(db_url)
    async with write_transaction(engine) as writer:
        await writer.insert_many([NewPrice(TICKER, price, 60 + n, None) for n, price in enumerate(NEAR)])
    await raw.executemany(_INSERT, [(3600 + n, price, "poll") for n, price in enumerate(NEAR)])
    async with engine.connect() as connection:
        reader = PriceReader(connection)
        rows = await reader.candles_from_rows(TICKER, 60, 0, 0, 10_000)
        hours = await reader.candles(TICKER, 3600, 0, 0, 10_000)
    high, low = max(NEAR), min(NEAR)
    assert [(c.high, c.low) for c in rows] == [(high, low), (high, low)]
    assert [(str(c.high), str(c.low)) for c in hours] == [(str(high), str(low))] * 2
    await raw.execute("DELETE FROM price_ticks WHERE price = ?", high)
    await raw.execute("DELETE FROM price_ticks WHERE price = ?", low)
    await assert_candles_equal_the_rows(engine, raw, "deleting the highest and lowest")


async def test_seq_is_never_handed_out_twice(engine: AsyncEngine, db_url: str) -> None:
    """Retention (or anyone) deletes the newest row; the next row must get a new number, or
    live readers that saw the old one skip it."""
    raw = Raw(db_url)
    async with write_transaction(engine) as writer:
        await writer.insert_many([NewPrice(TICKER, Decimal("1.5"), ts, None) for ts in (10, 20, 30)])
    before = await raw.seqs()
    async with write_transaction(engine) as writer:
        assert await writer.delete_older(TICKER, 31, limit=10) == 3
    async with write_transaction(engine) as writer:
        await writer.insert_many([NewPrice(TICKER, Decimal("2.5"), 40, None)])
    await raw.executemany(_INSERT, [(50, Decimal("3.5"), "poll")])
    after = await raw.seqs()
    assert len(after) == 2
    assert min(after) > max(before), (before, after)


hour_times = st.one_of(
    st.integers(0, 2 * 86_400),
    st.integers(0, 48).flatmap(lambda h: st.sampled_from([h * 3600, h * 3600 + 3599])),
)
prices = st.one_of(
    st.sampled_from([Decimal("1.5"), Decimal("1.50"), *NEAR]),
    st.decimals(
        min_value=Decimal("0.000000000000000001"), max_value=Decimal("99999999999999999999"), places=18
    ),
)
new_rows = st.lists(
    st.tuples(hour_times, prices, st.sampled_from(["poll", "backfill", "stream"])), max_size=30
)
spans = st.tuples(hour_times, hour_times).map(sorted)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("service"), new_rows),
        st.tuples(st.just("insert"), new_rows),
        st.tuples(st.just("copy"), new_rows),
        st.tuples(st.just("reprice"), spans, prices),
        st.tuples(st.just("move"), spans, st.integers(-7200, 7200)),
        st.tuples(st.just("delete"), spans),
        st.tuples(st.just("retention"), hour_times, st.integers(1, 20)),
    ),
    min_size=1,
    max_size=8,
)


async def apply(engine: AsyncEngine, raw: Raw, operation: tuple[Any, ...]) -> None:
    kind = operation[0]
    if kind == "service":
        async with write_transaction(engine) as writer:
            await writer.insert_many(
                [NewPrice(TICKER, price, ts, None, source) for ts, price, source in operation[1]]
            )
    elif kind == "insert" or (kind == "copy" and not raw.postgres):
        await raw.executemany(_INSERT + " ON CONFLICT DO NOTHING", operation[1])
    elif kind == "copy":
        unique = list({ts: (ts, price, source) for ts, price, source in operation[1]}.values())
        taken = {ts for ts, _, _ in await raw.rows()}
        await raw.copy([row for row in unique if row[0] not in taken])
    elif kind == "reprice":
        (lower, upper), price = operation[1], operation[2]
        await raw.execute("UPDATE price_ticks SET price = ? WHERE ts BETWEEN ? AND ?", price, lower, upper)
    elif kind == "move":
        (lower, upper), shift = operation[1], operation[2]
        # A moved row that meets a stored one fails the statement, which then changes nothing.
        with contextlib.suppress(asyncpg.UniqueViolationError, sqlite3.IntegrityError):
            await raw.execute(
                "UPDATE price_ticks SET ts = ts + ? WHERE ts BETWEEN ? AND ?",
                shift,
                max(lower, -shift),
                upper,
            )
    elif kind == "delete":
        lower, upper = operation[1]
        await raw.execute("DELETE FROM price_ticks WHERE ts BETWEEN ? AND ?", lower, upper)
    else:
        async with write_transaction(engine) as writer:
            await writer.delete_older(TICKER, operation[1], limit=operation[2])


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(mix=operations)
def test_candles_equal_the_rows_after_any_mix_of_writes(db_url: str, mix: list[tuple[Any, ...]]) -> None:
    async def check() -> None:
        engine = create_engine(db_url)
        raw = Raw(db_url)
        try:
            await empty_database(db_url)
            for operation in mix:
                await apply(engine, raw, operation)
            await assert_candles_equal_the_rows(engine, raw, repr(mix))
        finally:
            await engine.dispose()

    asyncio.run(check())
