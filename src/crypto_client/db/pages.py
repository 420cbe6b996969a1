"""Pages of prices rendered by the database: JSON arrays for the API, CSV or NDJSON batches
for exports, and column batches (`ts,price,source` lines) that Parquet is built from.

The database writes the text because that is several times faster than turning each row
into Python objects and back; prices keep their exact decimal text.
"""

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from sqlalchemy import (
    BigInteger,
    Integer,
    LargeBinary,
    Select,
    String,
    Text,
    bindparam,
    cast,
    func,
    literal,
    select,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.tables import PRICE_ROW_COLUMNS, price_ticks
from crypto_client.domain import MAX_TS, PriceRow

ExportFormat = Literal["csv", "ndjson"]
PageFormat = Literal["json", "csv", "ndjson"]
CSV_HEADER = "ticker,ts,price,source"


class TextPage(NamedTuple):
    text: str  # rows rendered by the database, joined by the format's separator
    rows: int
    next_ts: int | None  # where the next page starts, when there is one


class ColumnBatch(NamedTuple):
    lines: bytes  # `ts,price,source` lines (UTF-8), each ending in a newline, in no promised order
    rows: int
    next_ts: int | None  # where the next batch starts, when there may be one


class JsonPage(NamedTuple):
    json: str  # a JSON array of price objects (the fields of PriceRow), oldest first
    rows: int
    next_ts: int | None  # where the next page starts, when there is one


_c = price_ticks.c
_PAGE_ROWS = (
    select(*PRICE_ROW_COLUMNS)
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


_RENDERED: dict[PageFormat, dict[str, _Rendered]] = {
    "json": _rendered(_ROW_FORMAT, PriceRow._fields, ","),
    "csv": _rendered("%s,%s,%s,%s", CSV_HEADER.split(","), "\n"),
    "ndjson": _rendered(_ROW_FORMAT, PriceRow._fields, "\n"),
}


# Column batches: no ticker (the caller knows it), and no ORDER BY inside the aggregate, which
# PostgreSQL (before 16) would satisfy by sorting every batch again, half the query's time.
# Which rows a batch holds is still exact (the subquery's ORDER BY ts LIMIT); the order of the
# lines is what the aggregate happens to give, so a reader orders them itself. The lines come
# as bytes: no decoding into a str that the Parquet writer would only encode again.
_COLUMN_ROWS = (
    select(_c.ts, _c.price, _c.source)
    .where(
        _c.ticker == bindparam("ticker", type_=String),
        _c.ts.between(bindparam("lower", type_=BigInteger), bindparam("upper", type_=BigInteger)),
    )
    .order_by(_c.ts)
    .limit(bindparam("limit", type_=Integer))
    .subquery("batch")
)
_COLUMN_LINE = (
    cast(_COLUMN_ROWS.c.ts, Text)
    + literal(",")
    + cast(_COLUMN_ROWS.c.price, Text)
    + literal(",")
    + _COLUMN_ROWS.c.source
    + literal("\n")
)
_COLUMNS: dict[str, Select[bytes, int, Any]] = {
    "postgresql": select(
        func.convert_to(func.string_agg(_COLUMN_LINE, literal("")), literal("UTF8"), type_=LargeBinary),
        func.count(),
        func.max(_COLUMN_ROWS.c.ts),
    ),
    "sqlite": select(
        cast(func.group_concat(_COLUMN_LINE, literal("")), LargeBinary),
        func.count(),
        func.max(_COLUMN_ROWS.c.ts),
    ),
}


def column_batch_statement(dialect: str) -> Select[bytes, int, Any]:
    """The statement of `export_columns` on `dialect` (for query-plan checks); its
    parameters: ticker, lower, upper, limit."""
    return _COLUMNS[dialect]


def page_statement(fmt: PageFormat, dialect: str) -> Select[Any]:
    """The statement that renders a page in `fmt` on `dialect` (for query-plan checks);
    its parameters: ticker, lower, upper, limit, offset."""
    return _RENDERED[fmt][dialect].statement


class PageReads:
    """Part of `PriceReader`."""

    _connection: AsyncConnection

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
        as a JSON array of price objects. `start_ts` is the keyset cursor: one index seek at
        any depth, where `offset` reads and discards every row before the page."""
        lower = max(0 if from_ts is None else from_ts, 0 if start_ts is None else start_ts)
        upper = MAX_TS if to_ts is None else to_ts
        page = await self._render_page("json", ticker, lower, upper, limit, offset)
        return JsonPage(f"[{page.text}]", page.rows, page.next_ts)

    async def export_batch(
        self, ticker: str, fmt: ExportFormat, *, lower: int, upper: int, limit: int
    ) -> TextPage:
        """Up to `limit` rows from `lower` on, as CSV lines (`ticker,ts,price,source`) or
        NDJSON objects, newline-separated, no final newline."""
        return await self._render_page(fmt, ticker, lower, upper, limit)

    async def export_columns(self, ticker: str, *, lower: int, upper: int, limit: int) -> ColumnBatch:
        """The first `limit` rows from `lower` on (at most `upper`), as `ts,price,source` lines
        in any order (sort them by ts), prices as the database holds their exact text; the
        next batch may start at `next_ts` (it may be empty)."""
        parameters = {"ticker": ticker, "lower": lower, "upper": upper, "limit": limit}
        statement = _COLUMNS[self._connection.dialect.name]
        lines, rows, last_ts = (await self._connection.execute(statement, parameters)).one()
        more = rows == limit and last_ts < upper
        return ColumnBatch(lines or b"", rows, last_ts + 1 if more else None)

    async def _render_page(
        self, fmt: PageFormat, ticker: str, lower: int, upper: int, limit: int, offset: int = 0
    ) -> TextPage:
        rendered = _RENDERED[fmt][self._connection.dialect.name]
        parameters = {"ticker": ticker, "lower": lower, "upper": upper, "limit": limit + 1, "offset": offset}
        page, rows, last_ts = (await self._connection.execute(rendered.statement, parameters)).one()
        if rows <= limit:
            return TextPage(page or "", rows, None)
        # One row more than asked says a next page exists and where it starts.
        return TextPage(page[: page.rfind(rendered.row_start)], limit, last_ts)
