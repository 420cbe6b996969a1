"""All SQL of the service. The API reads through `PriceReader`, ingestion and back-fill
write through `PriceWriter`; neither builds a query of its own."""

import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any, Literal, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Float,
    Integer,
    Select,
    String,
    Table,
    bindparam,
    case,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable
from sqlalchemy.sql.selectable import TextualSelect

from crypto_client import metrics
from crypto_client.db.changes import CHANNEL, announce_stored
from crypto_client.db.models import (
    ExactDecimal,
    HourCandle,
    PriceTick,
    SlotFailureRecord,
    TrackedTicker,
    partition_rules,
)
from crypto_client.domain import MAX_TS, GapReason, NewPrice, PriceRow, SlotFailure

_table: Table = PriceTick.__table__  # type: ignore[assignment]
_c = _table.c
_tracked: Table = TrackedTicker.__table__  # type: ignore[assignment]
_failures: Table = SlotFailureRecord.__table__  # type: ignore[assignment]
_hours: Table = HourCandle.__table__  # type: ignore[assignment]
HOUR = 3600


class SlotSpan(NamedTuple):
    """Consecutive missing slots: the first and the last missing slot's start."""

    first_slot: int
    last_slot: int


ExportFormat = Literal["csv", "ndjson"]


class TextPage(NamedTuple):
    text: str  # rows rendered by the database, joined by the format's separator
    rows: int
    next_ts: int | None  # where the next page starts, when there is one


class Candle(NamedTuple):
    ts: int  # the bucket's start
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    rows: int
    backfilled: int


class JsonPage(NamedTuple):
    json: str  # a JSON array of price objects (the fields of PriceRow), oldest first
    rows: int
    next_ts: int | None  # where the next page starts, when there is one


class StoredRow(NamedTuple):
    """A row with its place in the order rows were stored (`seq`)."""

    seq: int
    row: PriceRow


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

    @property
    def connection(self) -> AsyncConnection:
        """For the readers of other table families (db/resample.py), on the same connection."""
        return self._connection

    async def ping(self) -> None:
        """Fails unless this connection can read `price_ticks` (reachable, migrated, allowed)."""
        await self._connection.execute(_PING)

    async def latest(self, ticker: str, *, not_after: int = MAX_TS) -> PriceRow | None:
        """The row with the largest `ts` up to `not_after` (one index seek): a bound below
        MAX_TS keeps rows dated in the future from passing for the newest price."""
        row = (await self._connection.execute(_LATEST, {"ticker": ticker, "not_after": not_after})).first()
        return None if row is None else PriceRow._make(row)

    async def is_known(self, ticker: str) -> bool:
        """Whether `ticker` has rows or is tracked (two index seeks)."""
        return bool(await self._connection.scalar(_KNOWN, {"ticker": ticker}))

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
        page = await self._render_page(_PAGE_JSON, ticker, lower, upper, limit, offset)
        return JsonPage(f"[{page.text}]", page.rows, page.next_ts)

    async def export_batch(
        self, ticker: str, fmt: ExportFormat, *, lower: int, upper: int, limit: int
    ) -> TextPage:
        """Up to `limit` rows from `lower` on, rendered by the database as CSV lines
        (`ticker,ts,price,source`) or NDJSON objects, newline-separated, no final newline."""
        return await self._render_page(_EXPORT[fmt], ticker, lower, upper, limit)

    async def _render_page(
        self,
        statements: Mapping[str, "_Rendered"],
        ticker: str,
        lower: int,
        upper: int,
        limit: int,
        offset: int = 0,
    ) -> TextPage:
        rendered = statements[self._connection.dialect.name]
        parameters = {"ticker": ticker, "lower": lower, "upper": upper, "limit": limit + 1, "offset": offset}
        page, rows, last_ts = (await self._connection.execute(rendered.statement, parameters)).one()
        if rows <= limit:
            return TextPage(page or "", rows, None)
        # One row more than asked says a next page exists and where it starts.
        return TextPage(page[: page.rfind(rendered.row_start)], limit, last_ts)

    async def at(self, ticker: str, ts: int) -> PriceRow | None:
        """The last row at or before `ts`: one index seek."""
        row = (await self._connection.execute(_AT, {"ticker": ticker, "ts": ts})).first()
        return None if row is None else PriceRow._make(row)

    async def latest_of(self, tickers: Sequence[str], *, not_after: int = MAX_TS) -> dict[str, PriceRow]:
        """The latest row of each ticker up to `not_after` (as `latest`), in one statement
        (an index seek per ticker)."""
        if not tickers:
            return {}
        # Each part is wrapped in a subquery: SQLite allows no LIMIT on a bare UNION member.
        newest = [
            select(*_ROW_COLUMNS)
            .where(_c.ticker == literal(ticker, String), _c.ts <= literal(not_after, BigInteger))
            .order_by(_c.ts.desc())
            .limit(1)
            .subquery()
            for ticker in tickers
        ]
        result = await self._connection.execute(union_all(*(select(*part.c) for part in newest)))
        return {row[0]: PriceRow._make(row) for row in result}

    async def first_ts(self, ticker: str, lower: int, upper: int) -> int | None:
        """The time of the first row in `lower..upper` (one index seek)."""
        found = await self._connection.scalar(_FIRST_TS, {"ticker": ticker, "lower": lower, "upper": upper})
        return None if found is None else int(found)

    async def candles(self, ticker: str, size: int, origin: int, lower: int, upper: int) -> list[Candle]:
        """OHLC candles of the rows in `lower..upper`, in buckets of `size` seconds aligned
        to `origin` (UTC), oldest first; empty buckets are absent.

        Buckets made of whole hours are merged from the hourly roll-up (the hours cut by
        `lower` or `upper` from the rows), so a year of 1-minute rows is 8,760 roll-up rows."""
        if size % HOUR or origin % HOUR:
            return await self._row_candles(ticker, size, origin, lower, upper)
        first_whole = -(-lower // HOUR) * HOUR
        end_whole = (upper + 1) // HOUR * HOUR  # exclusive
        if first_whole >= end_whole:
            hours = await self._row_candles(ticker, HOUR, 0, lower, upper)
        else:
            hours = []
            if lower < first_whole:
                hours += await self._row_candles(ticker, HOUR, 0, lower, first_whole - 1)
            result = await self._connection.execute(
                _HOURS, {"ticker": ticker, "lower": first_whole, "upper": end_whole - HOUR}
            )
            hours += [Candle._make(row) for row in result]
            if end_whole <= upper:
                hours += await self._row_candles(ticker, HOUR, 0, end_whole, upper)
        return _merge_candles(hours, size, origin)

    async def _row_candles(self, ticker: str, size: int, origin: int, lower: int, upper: int) -> list[Candle]:
        statement = _CANDLES[self._connection.dialect.name]
        parameters = {"ticker": ticker, "size": size, "origin": origin, "lower": lower, "upper": upper}
        return [Candle._make(row) for row in await self._connection.execute(statement, parameters)]

    async def tracked_since(self, ticker: str) -> int | None:
        since = await self._connection.scalar(
            select(_tracked.c.since_slot_ts).where(_tracked.c.ticker == bindparam("ticker", type_=String)),
            {"ticker": ticker},
        )
        return None if since is None else int(since)

    async def stored_slots_by_source(self, ticker: str, first_slot: int, last_slot: int) -> dict[str, int]:
        """How many slots in `first_slot..last_slot` have a row, per source."""
        result = await self._connection.execute(
            _SLOTS_BY_SOURCE, {"ticker": ticker, "lower": first_slot, "upper": last_slot}
        )
        return {str(source): int(count) for source, count in result}

    async def missing_spans(
        self, ticker: str, first_slot: int, last_slot: int, interval: int, *, limit: int
    ) -> tuple[list[SlotSpan], int | None]:
        """Up to `limit` runs of slots without a row in `first_slot..last_slot`, oldest first,
        and the first slot of the next run when there are more. One walk of the
        `(ticker, slot_ts)` index: each run is a step between consecutive stored slots."""
        bounds = {"ticker": ticker, "lower": first_slot, "upper": last_slot}
        low, high = (await self._connection.execute(_SLOT_BOUNDS, bounds)).one()
        if low is None:
            return [SlotSpan(first_slot, last_slot)], None
        spans = []
        if low > first_slot:
            spans.append(SlotSpan(first_slot, low - interval))
        steps = await self._connection.execute(
            _SLOT_STEPS, {**bounds, "interval": interval, "limit": limit + 1}
        )
        spans.extend(SlotSpan(previous + interval, current - interval) for previous, current in steps)
        if high < last_slot:
            spans.append(SlotSpan(high + interval, last_slot))
        if len(spans) > limit:
            return spans[:limit], spans[limit].first_slot
        return spans, None

    async def slot_failures(self, ticker: str, first_slot: int, last_slot: int) -> list[SlotFailure]:
        result = await self._connection.execute(
            _FAILURES_IN, {"ticker": ticker, "lower": first_slot, "upper": last_slot}
        )
        return [SlotFailure(ticker, slot, cast(GapReason, reason), detail) for slot, reason, detail in result]

    async def stored_tickers(self) -> list[str]:
        """Every ticker with rows, by skipping through the primary-key index (one seek per
        ticker, not a scan)."""
        return list(await self._connection.scalars(_STORED_TICKERS))

    async def newest_seq(self) -> int:
        """The `seq` of the row stored last (0 when none has one)."""
        return int((await self._connection.execute(_NEWEST_SEQ)).scalar_one())

    async def stored_after(self, seq: int, tickers: Sequence[str] | None, *, limit: int) -> list[StoredRow]:
        """Up to `limit` rows stored after `seq`, of `tickers` (every ticker when None), in
        the order they were stored."""
        query = _STORED_AFTER if tickers is None else _STORED_AFTER.where(_c.ticker.in_(tickers))
        result = await self._connection.execute(query, {"seq": seq, "limit": limit})
        return [
            StoredRow(seq, PriceRow(ticker, price, ts, source)) for seq, ticker, price, ts, source in result
        ]

    async def ticker_stats(self) -> list[TickerStats]:
        query = (
            select(_c.ticker, func.count(), func.min(_c.ts), func.max(_c.ts))
            .group_by(_c.ticker)
            .order_by(_c.ticker)
        )
        result = await self._connection.execute(query)
        return [TickerStats._make(row) for row in result]


def _merge_candles(candles: Sequence[Candle], size: int, origin: int) -> list[Candle]:
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


def _hour_rollups(rows: Sequence[tuple[str, int, Decimal, str]]) -> list[dict[str, Any]]:
    """The roll-up rows of newly inserted `(ticker, ts, price, source)` rows."""
    hours: dict[tuple[str, int], dict[str, Any]] = {}
    for ticker, ts, price, source in sorted(rows, key=lambda row: (row[0], row[1])):
        hour = hours.get((ticker, ts - ts % HOUR))
        if hour is None:
            hours[(ticker, ts - ts % HOUR)] = {
                "ticker": ticker,
                "bucket": ts - ts % HOUR,
                "open_ts": ts,
                "open": price,
                "high": price,
                "low": price,
                "close_ts": ts,
                "close": price,
                "rows": 1,
                "backfilled": int(source == "backfill"),
            }
            continue
        hour["high"] = max(hour["high"], price)
        hour["low"] = min(hour["low"], price)
        hour["close_ts"], hour["close"] = ts, price
        hour["rows"] += 1
        hour["backfilled"] += source == "backfill"
    return list(hours.values())


class Partition(NamedTuple):
    name: str
    lower: int  # inclusive, UNIX seconds
    upper: int  # exclusive


class PartitionAdmin:
    """Upkeep of `price_ticks`'s time partitions on PostgreSQL (revision 0006): listing,
    creating ahead of time, dropping. DDL with names and bounds this class makes itself."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def partitioned(self) -> bool:
        if self._connection.dialect.name != "postgresql":
            return False
        kind = await self._connection.scalar(
            text("SELECT relkind::text FROM pg_class WHERE oid = 'price_ticks'::regclass")
        )
        return bool(kind == "p")

    async def range_partitions(self) -> list[Partition]:
        """The partitions with bounds (not the default one), oldest first."""
        result = await self._connection.execute(_RANGE_PARTITIONS)
        found = []
        for name, bound in result:
            match = _BOUND.search(bound)
            if match is not None:
                found.append(Partition(name, int(match.group(1)), int(match.group(2))))
        return sorted(found, key=lambda partition: partition.lower)

    async def create(self, partition: Partition) -> int:
        """Create `partition` and move into it the rows the default partition holds for its
        range (they arrived before it existed); returns how many moved. The default partition
        takes no rows meanwhile: none can slip between the copy and the delete. Attaching
        locks the default partition for an instant: see `_wait_briefly_for_locks`."""
        name, lower, upper = self._quote(partition.name), int(partition.lower), int(partition.upper)
        primary_key, in_range = self._quote("pk_" + partition.name), self._quote(partition.name + "_range")
        await self._wait_briefly_for_locks()
        # Only names and integers this class made go into these statements.
        for statement in (
            "LOCK TABLE price_ticks_default IN SHARE ROW EXCLUSIVE MODE",
            f"CREATE TABLE {name} (LIKE price_ticks INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
            f"ALTER TABLE {name} ADD CONSTRAINT {primary_key} PRIMARY KEY (ticker, ts)",
            # Lets ATTACH skip its scan.
            f"ALTER TABLE {name} ADD CONSTRAINT {in_range} CHECK (ts >= {lower} AND ts < {upper})",
            *partition_rules(partition.name),
        ):
            await self._connection.execute(text(statement))
        moved = await self._connection.execute(
            text(
                "WITH moved AS (DELETE FROM price_ticks_default"  # noqa: S608 - see above
                f" WHERE ts >= {lower} AND ts < {upper} RETURNING *) INSERT INTO {name} SELECT * FROM moved"
            )
        )
        await self._connection.execute(
            text(f"ALTER TABLE price_ticks ATTACH PARTITION {name} FOR VALUES FROM ({lower}) TO ({upper})")
        )
        return int(moved.rowcount)

    async def drop(self, partition: Partition) -> None:
        """Drop `partition`. (DETACH ... CONCURRENTLY would take no exclusive lock, but
        PostgreSQL refuses it beside a default partition.)"""
        await self._wait_briefly_for_locks()
        await self._connection.execute(text(f"DROP TABLE {self._quote(partition.name)}"))

    async def _wait_briefly_for_locks(self) -> None:
        # Creating and dropping partitions take exclusive locks for an instant, but a lock
        # request waits behind running queries and new queries queue behind it: give up
        # after `_LOCK_TIMEOUT` (the statement fails with a lock timeout; try again later).
        await self._connection.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))

    def _quote(self, identifier: str) -> str:
        return str(self._connection.dialect.identifier_preparer.quote(identifier))


_LOCK_TIMEOUT = "200ms"
_BOUND = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")
_RANGE_PARTITIONS = text(
    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
    " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'price_ticks'::regclass"
)


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator["PriceWriter"]:
    """One write transaction; once it has committed rows, live readers are woken."""
    with metrics.DATABASE_WRITE_DURATION.time():
        async with engine.begin() as connection:
            writer = PriceWriter(connection)
            yield writer
    if writer.stored_rows:
        announce_stored()


class PriceWriter:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection
        self.stored_rows = False

    async def insert_many(self, prices: Sequence[NewPrice]) -> list[tuple[str, int]]:
        """Insert `prices`, skipping any whose `(ticker, ts)` or `(ticker, slot_ts)` is taken.

        Returns the `(ticker, ts)` of the rows that were new. The caller owns the transaction.
        """
        if not prices:
            return []
        dialect = self._connection.dialect.name
        if dialect == "postgresql" and not self.stored_rows:
            # Writers take `seq` numbers and commit one at a time, so a number is visible only
            # after every smaller one: a live reader that resumes after `seq` misses nothing.
            await self._connection.execute(_SERIALIZE_WRITERS)
        # One compiled statement, sent as multi-row VALUES batches (SQLAlchemy's insertmanyvalues).
        result = await self._connection.execute(_INSERT[dialect], [price._asdict() for price in prices])
        new_rows = [(ticker, ts, price, source) for ticker, ts, price, source in result]
        if not new_rows:
            return []
        await self._connection.execute(_MERGE_HOURS[dialect], _hour_rollups(new_rows))
        if not self.stored_rows and dialect == "postgresql":
            await self._connection.execute(_NOTIFY_STORED)  # delivered when the transaction commits
        self.stored_rows = True
        return [(ticker, ts) for ticker, ts, _, _ in new_rows]

    async def stored_exactly(self, prices: Sequence[NewPrice]) -> set[tuple[str, int]]:
        """The `(ticker, ts)` of those `prices` the table holds exactly as given (same slot,
        price and source): how a writer whose COMMIT went unanswered recognises its own rows."""
        if not prices:
            return set()
        keys = [(price.ticker, price.ts) for price in prices]
        result = await self._connection.execute(_ROWS_AT, {"keys": keys})
        stored = {(ticker, ts): (price, slot_ts, source) for ticker, ts, price, slot_ts, source in result}
        return {
            (price.ticker, price.ts)
            for price in prices
            if stored.get((price.ticker, price.ts)) == (price.price, price.slot_ts, price.source)
        }

    async def track(self, tickers: Sequence[str], since_slot_ts: int) -> None:
        """Start tracking `tickers` at `since_slot_ts`, unless they are tracked already."""
        if tickers:
            await self._connection.execute(
                _TRACK[self._connection.dialect.name],
                [{"ticker": ticker, "since_slot_ts": since_slot_ts} for ticker in tickers],
            )

    async def delete_older(self, ticker: str, cutoff: int, *, limit: int) -> int:
        """Delete up to `limit` of `ticker`'s rows with `ts < cutoff`, oldest first; returns
        how many (fewer than `limit`: none is left)."""
        result = await self._connection.execute(
            _DELETE_OLDER, {"ticker": ticker, "cutoff": cutoff, "limit": limit}
        )
        return int(result.rowcount)

    async def expire_before(self, cutoff_hour: int, first_slot: int) -> None:
        """What describes rows before `cutoff_hour` (an hour's start) goes with them: their
        roll-up hours and ledger entries; tracking starts again at `first_slot`, so that
        coverage does not count the removed slots as missing."""
        await self._connection.execute(delete(_hours).where(_hours.c.bucket < cutoff_hour))
        await self._connection.execute(delete(_failures).where(_failures.c.slot_ts < first_slot))
        await self._connection.execute(
            update(_tracked).where(_tracked.c.since_slot_ts < first_slot).values(since_slot_ts=first_slot)
        )

    async def record_failures(self, failures: Sequence[SlotFailure]) -> None:
        """Write ledger entries; a slot's newer entry replaces its older one."""
        if failures:
            await self._connection.execute(
                _RECORD_FAILURE[self._connection.dialect.name],
                [failure._asdict() for failure in failures],
            )


# Built once: every request reuses the compiled statement (and, on PostgreSQL, the prepared one).
_PING = select(literal(1)).select_from(_table).limit(1)
_ROW_COLUMNS = [_c[name] for name in PriceRow._fields]
_LATEST = (
    select(*_ROW_COLUMNS)
    .where(_c.ticker == bindparam("ticker", type_=String), _c.ts <= bindparam("not_after", type_=BigInteger))
    .order_by(_c.ts.desc())
    .limit(1)
)
_KNOWN = select(
    or_(
        exists().where(_c.ticker == bindparam("ticker", type_=String)),
        exists().where(_tracked.c.ticker == bindparam("ticker", type_=String)),
    )
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
# A price object per row, keys in PriceRow's order; its strings (an index name, a source)
# have nothing to escape.
_STRING_FIELDS = {"ticker", "source"}
_ROW_FORMAT = (
    "{"
    + ",".join(f'"{name}":"%s"' if name in _STRING_FIELDS else f'"{name}":%s' for name in PriceRow._fields)
    + "}"
)


class _Rendered(NamedTuple):
    statement: Select[Any]
    row_start: str  # what begins every row but the first: where to cut the extra row


def _rendered(row_format: str, columns: Sequence[str], separator: str) -> dict[str, _Rendered]:
    values = [_PAGE_ROWS.c[name] for name in columns]
    row_start = separator + row_format[: row_format.index("%")]
    return {
        "postgresql": _Rendered(
            select(
                func.string_agg(
                    func.format(row_format, *values), aggregate_order_by(literal(separator), _PAGE_ROWS.c.ts)
                ),
                func.count(),
                func.max(_PAGE_ROWS.c.ts),
            ),
            row_start,
        ),
        # SQLite concatenates in the order the ordered subquery yields its rows.
        "sqlite": _Rendered(
            select(
                func.group_concat(func.printf(row_format, *values), separator),
                func.count(),
                func.max(_PAGE_ROWS.c.ts),
            ),
            row_start,
        ),
    }


_PAGE_JSON = _rendered(_ROW_FORMAT, PriceRow._fields, ",")
CSV_HEADER = "ticker,ts,price,source"
_EXPORT: dict[ExportFormat, dict[str, _Rendered]] = {
    "csv": _rendered("%s,%s,%s,%s", CSV_HEADER.split(","), "\n"),
    "ndjson": _rendered(_ROW_FORMAT, PriceRow._fields, "\n"),
}
_AT = (
    select(*_ROW_COLUMNS)
    .where(_c.ticker == bindparam("ticker", type_=String), _c.ts <= bindparam("ts", type_=BigInteger))
    .order_by(_c.ts.desc())
    .limit(1)
)
_FIRST_TS = select(func.min(_c.ts)).where(
    _c.ticker == bindparam("ticker", type_=String),
    _c.ts.between(bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)),
)
_CANDLE_COLUMNS = {
    "ts": BigInteger,
    "open": ExactDecimal,
    "high": ExactDecimal,
    "low": ExactDecimal,
    "close": ExactDecimal,
    "rows": Integer,
    "backfilled": Integer,
}
# Typed by name: the SELECT lists below name their columns so, or prices stay SQLite's text.
_CANDLES: dict[str, TextualSelect] = {
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
    # Prices are text on SQLite: compare them as numbers, return the stored text (a bare
    # column beside a single max() or min() comes from that row).
    "sqlite": text(
        """
        WITH r AS (
            SELECT ts, price, source, ts - ((((ts - :origin) % :size) + :size) % :size) AS bucket
            FROM price_ticks WHERE ticker = :ticker AND ts BETWEEN :lower AND :upper),
        agg AS (
            SELECT bucket, min(ts) AS first_ts, max(ts) AS last_ts, count(*) AS rows,
                   sum(source = 'backfill') AS backfilled
            FROM r GROUP BY bucket),
        hi AS (SELECT bucket, max(CAST(price AS REAL)) AS v, price FROM r GROUP BY bucket),
        lo AS (SELECT bucket, min(CAST(price AS REAL)) AS v, price FROM r GROUP BY bucket)
        SELECT agg.bucket AS ts, o.price AS open, hi.price AS high, lo.price AS low,
               c.price AS close, agg.rows AS rows, agg.backfilled AS backfilled
        FROM agg JOIN hi ON hi.bucket = agg.bucket JOIN lo ON lo.bucket = agg.bucket
        JOIN price_ticks o ON o.ticker = :ticker AND o.ts = agg.first_ts
        JOIN price_ticks c ON c.ticker = :ticker AND c.ts = agg.last_ts
        ORDER BY agg.bucket
        """
    ).columns(**_CANDLE_COLUMNS),
}
_INSERT = {
    "postgresql": postgresql.insert(_table)
    .on_conflict_do_nothing()
    .returning(_c.ticker, _c.ts, _c.price, _c.source),
    "sqlite": sqlite.insert(_table).on_conflict_do_nothing().returning(_c.ticker, _c.ts, _c.price, _c.source),
}
_ROWS_AT = select(_c.ticker, _c.ts, _c.price, _c.slot_ts, _c.source).where(
    tuple_(_c.ticker, _c.ts).in_(bindparam("keys", expanding=True))
)
_HOURS = (
    select(
        _hours.c.bucket,
        _hours.c.open,
        _hours.c.high,
        _hours.c.low,
        _hours.c.close,
        _hours.c.rows,
        _hours.c.backfilled,
    )
    .where(
        _hours.c.ticker == bindparam("ticker", type_=String),
        _hours.c.bucket.between(bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)),
    )
    .order_by(_hours.c.bucket)
)


def _merge_hours(insert: Any, value: Callable[[ColumnElement[Any]], ColumnElement[Any]]) -> Executable:
    """Fold new roll-up rows into existing ones; `value` makes a price comparable (SQLite
    stores text)."""
    new, old = insert.excluded, _hours.c
    statement: Executable = insert.on_conflict_do_update(
        index_elements=[old.ticker, old.bucket],
        set_={
            "open_ts": case((new.open_ts < old.open_ts, new.open_ts), else_=old.open_ts),
            "open": case((new.open_ts < old.open_ts, new.open), else_=old.open),
            "close_ts": case((new.close_ts > old.close_ts, new.close_ts), else_=old.close_ts),
            "close": case((new.close_ts > old.close_ts, new.close), else_=old.close),
            "high": case((value(new.high) > value(old.high), new.high), else_=old.high),
            "low": case((value(new.low) < value(old.low), new.low), else_=old.low),
            "rows": old.rows + new.rows,
            "backfilled": old.backfilled + new.backfilled,
        },
    )
    return statement


_MERGE_HOURS = {
    "postgresql": _merge_hours(postgresql.insert(_hours), lambda price: price),
    "sqlite": _merge_hours(sqlite.insert(_hours), lambda price: sql_cast(price, Float)),
}

_oldest = (
    select(_c.ticker, _c.ts)
    .where(_c.ticker == bindparam("ticker", type_=String), _c.ts < bindparam("cutoff", type_=BigInteger))
    .order_by(_c.ts)
    .limit(bindparam("limit", type_=Integer))
)
_DELETE_OLDER = delete(_table).where(tuple_(_c.ticker, _c.ts).in_(_oldest))
# A loose index scan: each step seeks the next ticker after the previous one.
_walk = select(func.min(_c.ticker).label("ticker")).cte("tickers", recursive=True)
_after = select(func.min(_c.ticker)).where(_c.ticker > _walk.c.ticker).correlate(_walk).scalar_subquery()
_walk = _walk.union_all(select(_after.label("ticker")).where(_walk.c.ticker.is_not(None)))
_STORED_TICKERS = select(_walk.c.ticker).where(_walk.c.ticker.is_not(None))

# pg_advisory_xact_lock's key: any constant no other lock of this database uses.
_WRITERS_LOCK_KEY = 0x70726963  # "pric"
_SERIALIZE_WRITERS = select(func.pg_advisory_xact_lock(_WRITERS_LOCK_KEY))
_NOTIFY_STORED = select(func.pg_notify(CHANNEL, ""))
_NEWEST_SEQ = select(func.coalesce(func.max(_c.seq), 0))
_STORED_AFTER = (
    select(_c.seq, *_ROW_COLUMNS)
    .where(_c.seq > bindparam("seq", type_=BigInteger))
    .order_by(_c.seq)
    .limit(bindparam("limit", type_=Integer))
)

_IN_SLOTS = (
    _c.ticker == bindparam("ticker", type_=String),
    _c.slot_ts.between(bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)),
)
_SLOTS_BY_SOURCE = select(_c.source, func.count()).where(*_IN_SLOTS).group_by(_c.source)
_SLOT_BOUNDS = select(func.min(_c.slot_ts), func.max(_c.slot_ts)).where(*_IN_SLOTS)
_STEPS = select(_c.slot_ts, func.lag(_c.slot_ts).over(order_by=_c.slot_ts).label("previous")).where(
    *_IN_SLOTS
)
_steps = _STEPS.subquery("steps")
_SLOT_STEPS = (
    select(_steps.c.previous, _steps.c.slot_ts)
    .where(_steps.c.slot_ts - _steps.c.previous > bindparam("interval", type_=BigInteger))
    .order_by(_steps.c.slot_ts)
    .limit(bindparam("limit", type_=Integer))
)
_FAILURES_IN = (
    select(_failures.c.slot_ts, _failures.c.reason, _failures.c.detail)
    .where(
        _failures.c.ticker == bindparam("ticker", type_=String),
        _failures.c.slot_ts.between(
            bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)
        ),
    )
    .order_by(_failures.c.slot_ts)
)
_TRACK = {
    "postgresql": postgresql.insert(_tracked).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(_tracked).on_conflict_do_nothing(),
}


def _upsert_failure(insert: postgresql.Insert | sqlite.Insert) -> Executable:
    return insert.on_conflict_do_update(
        index_elements=[_failures.c.ticker, _failures.c.slot_ts],
        set_={"reason": insert.excluded.reason, "detail": insert.excluded.detail},
    )


_RECORD_FAILURE: Mapping[str, Executable] = {
    "postgresql": _upsert_failure(postgresql.insert(_failures)),
    "sqlite": _upsert_failure(sqlite.insert(_failures)),
}
