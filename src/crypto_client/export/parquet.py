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
# Rows per row group, and per database batch (a batch is written as a row group of its own):
# large enough to compress well and cost few queries, small enough to keep memory bounded.
ROW_GROUP_ROWS = 50_000
BATCH_ROWS = ROW_GROUP_ROWS
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
# One thread: the database and the server share the cores. One block for a whole batch.
_CSV_READ = pa_csv.ReadOptions(column_names=["ts", "price", "source"], use_threads=False, block_size=1 << 24)
_CSV_CONVERT = pa_csv.ConvertOptions(
    column_types={"ts": pa.int64(), "price": pa.string(), "source": pa.string()},
    strings_can_be_null=False,
    quoted_strings_can_be_null=False,
)


def table_of(ticker: str, lines: bytes) -> pa.Table:
    """The rows of a column batch (`ts,price,source` lines in any order, prices as the
    database holds their exact text) as a table of `SCHEMA`, oldest first."""
    raw = pa_csv.read_csv(pa.py_buffer(lines), read_options=_CSV_READ, convert_options=_CSV_CONVERT)
    ts = raw["ts"]
    if len(ts) > 1 and not pc.all(pc.less(ts[:-1], ts[1:])).as_py():
        raw = raw.take(pc.sort_indices(ts))
        ts = raw["ts"]
    text = raw["price"]
    return pa.Table.from_arrays(
        [
            # One dictionary entry, every index 0: no per-row encoding.
            pa.DictionaryArray.from_arrays(
                pa.repeat(pa.scalar(0, pa.int32()), len(ts)), pa.array([ticker], pa.string())
            ),
            ts,
            ts.cast(pa.timestamp("s", tz="UTC")),
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
            batch = await reader.export_columns(ticker, lower=start, upper=upper, limit=batch_rows)
        if batch.rows:
            yield table_of(ticker, batch.lines)
        start = batch.next_ts


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
    """A Parquet file of one ticker's rows produced piecewise: `add` column batches (each
    becomes a row group) and send the bytes it returns, then what `finish` returns (the
    footer). A body cut before the footer is no Parquet file: every reader refuses it."""

    def __init__(self, ticker: str) -> None:
        self._ticker = ticker
        self._sink = _Chunks()
        self._writer = pq.ParquetWriter(self._sink, SCHEMA, **WRITER_OPTIONS)

    def add(self, lines: bytes) -> bytes:
        """Write a column batch (as `table_of` takes it) as a row group; returns its bytes."""
        table = table_of(self._ticker, lines)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        return self._sink.take()

    def finish(self) -> bytes:
        self._writer.close()
        return self._sink.take()


def write_file(path: Path, table: pa.Table) -> None:
    pq.write_table(table.unify_dictionaries().combine_chunks(), path, **WRITER_OPTIONS)
