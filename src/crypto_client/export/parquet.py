"""Prices as Arrow tables and Parquet, from the export batches of `PriceReader` (keyset walks
of the primary key, bounded memory whatever the range)."""

import io
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from crypto_client.db.pages import CSV_HEADER
from crypto_client.db.reader import PriceReader
from crypto_client.domain import MAX_PRICE_DECIMAL_PLACES, MAX_PRICE_INTEGER_DIGITS

OpenReader = Callable[[], AbstractAsyncContextManager[PriceReader]]

# Every price the service stores (below 10^20, at most 18 places) fits exactly.
PRICE_TYPE = pa.decimal128(MAX_PRICE_INTEGER_DIGITS + MAX_PRICE_DECIMAL_PLACES, MAX_PRICE_DECIMAL_PLACES)
SCHEMA = pa.schema(
    [
        pa.field("ticker", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("time", pa.timestamp("s", tz="UTC"), nullable=False),
        pa.field("price", PRICE_TYPE, nullable=False),
        pa.field("price_text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)
BATCH_ROWS = 10_000
# Rows per row group: large enough to compress well, small enough to keep memory bounded.
ROW_GROUP_ROWS = 100_000
WRITER_OPTIONS: dict[str, object] = {
    "compression": "zstd",
    "use_dictionary": ["ticker", "source"],
    "column_encoding": {
        "ts": "DELTA_BINARY_PACKED",
        "time": "DELTA_BINARY_PACKED",
        "price": "PLAIN",
        "price_text": "DELTA_BYTE_ARRAY",
    },
}
_CSV_COLUMNS = CSV_HEADER.split(",")
# One thread: the batches are small, and the database and the server share the cores.
_CSV_READ = pa_csv.ReadOptions(column_names=_CSV_COLUMNS, use_threads=False)
_CSV_CONVERT = pa_csv.ConvertOptions(
    column_types={"ticker": pa.string(), "ts": pa.int64(), "price": pa.string(), "source": pa.string()},
    strings_can_be_null=False,
    quoted_strings_can_be_null=False,
)


def table_of(csv_lines: str) -> pa.Table:
    """The rows of an export batch (CSV lines `ticker,ts,price,source`, prices as the database
    holds their exact text) as a table of `SCHEMA`."""
    raw = pa_csv.read_csv(
        io.BytesIO(csv_lines.encode()), read_options=_CSV_READ, convert_options=_CSV_CONVERT
    )
    text = raw["price"]
    return pa.Table.from_arrays(
        [
            pc.dictionary_encode(raw["ticker"]),
            raw["ts"],
            raw["ts"].cast(pa.timestamp("s", tz="UTC")),
            # A cast that would lose a digit fails rather than rounds.
            text.cast(PRICE_TYPE),
            text,
            raw["source"],
        ],
        schema=SCHEMA,
    )


async def tables(
    open_reader: OpenReader, ticker: str, lower: int, upper: int, *, batch_rows: int = BATCH_ROWS
) -> AsyncIterator[pa.Table]:
    """`ticker`'s rows in `lower..upper`, oldest first, a batch at a time (each read on a
    connection of its own)."""
    start: int | None = lower
    while start is not None:
        async with open_reader() as reader:
            page = await reader.export_batch(ticker, "csv", lower=start, upper=upper, limit=batch_rows)
        if page.rows:
            yield table_of(page.text)
        start = page.next_ts


class _Chunks(io.RawIOBase):
    """A write-only file whose bytes are taken out as they come."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = bytes(data)
        self._parts.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class ParquetStream:
    """A Parquet file produced piecewise: `add` tables, send what `add` returns (whole row
    groups), then what `finish` returns (the last row group and the footer). A body cut before
    the footer is no Parquet file: every reader refuses it."""

    def __init__(self) -> None:
        self._sink = _Chunks()
        self._writer = pq.ParquetWriter(self._sink, SCHEMA, **WRITER_OPTIONS)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, csv_lines: str) -> bytes:
        """Take an export batch (as `table_of`); returns the bytes of any row group it completed."""
        table = table_of(csv_lines)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows < ROW_GROUP_ROWS:
            return b""
        return self._flush()

    def finish(self) -> bytes:
        last_groups = self._flush()
        self._writer.close()
        return last_groups + self._sink.take()

    def _flush(self) -> bytes:
        if self._pending:
            # Dictionaries of the batches differ: unify them into the row group's one.
            group = pa.concat_tables(self._pending).unify_dictionaries().combine_chunks()
            self._writer.write_table(group, row_group_size=max(1, group.num_rows))
            self._pending.clear()
            self._pending_rows = 0
        return self._sink.take()


def write_file(path: Path, table: pa.Table) -> None:
    pq.write_table(table.unify_dictionaries().combine_chunks(), path, **WRITER_OPTIONS)
