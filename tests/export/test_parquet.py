"""Parquet's inputs: the database's column batches (every row once, on PostgreSQL and on
SQLite), the tables built from them (ordered, exact), and pyarrow as API processes load it."""

import io
import subprocess
import sys
from decimal import Decimal

import pyarrow.parquet as pq
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.reader import PriceReader
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import MAX_TS, NewPrice
from crypto_client.export.parquet import SCHEMA, ParquetStream, table_of

LARGEST = "99999999999999999999.999999999999999999"
SMALLEST = "0.000000000000000001"


def test_a_table_is_ordered_exact_and_of_the_schema() -> None:
    # The database promises which rows a batch holds, not the order of its lines.
    lines = f"180,2291.40,poll\n60,{LARGEST},backfill\n120,{SMALLEST},stream\n".encode()
    table = table_of("btc_usd", lines)
    assert table.schema == SCHEMA
    assert table.column("ts").to_pylist() == [60, 120, 180]
    assert table.column("price").to_pylist() == [Decimal(LARGEST), Decimal(SMALLEST), Decimal("2291.40")]
    assert table.column("price_text").to_pylist() == [LARGEST, SMALLEST, "2291.40"]
    assert table.column("source").to_pylist() == ["backfill", "stream", "poll"]
    ticker = table.column("ticker").combine_chunks()
    assert ticker.dictionary.to_pylist() == ["btc_usd"]
    assert ticker.to_pylist() == ["btc_usd"] * 3


def test_each_batch_is_a_row_group_and_the_footer_comes_last() -> None:
    stream = ParquetStream("eth_usd")
    body = stream.add(b"2,1.5,poll\n1,2.5,poll\n") + stream.add(b"3,3.5,stream\n")
    assert body.startswith(b"PAR1")
    body += stream.finish()
    file = pq.ParquetFile(io.BytesIO(body))
    assert file.num_row_groups == 2
    table = file.read()
    assert table.column("ts").to_pylist() == [1, 2, 3]
    assert table.column("price_text").to_pylist() == ["2.5", "1.5", "3.5"]


async def test_column_batches_hold_every_row_once(engine: AsyncEngine) -> None:
    prices = [
        NewPrice("btc_usd", Decimal(f"{ts}.{ts:018d}"), ts, None, "poll" if ts % 3 else "stream")
        for ts in range(100, 125)
    ]
    async with engine.begin() as connection:
        await PriceWriter(connection).insert_many(
            [*prices, NewPrice("eth_usd", Decimal("1"), 110, None, "poll")]
        )
    async with engine.connect() as connection:
        reader = PriceReader(connection)
        seen: list[int] = []
        start: int | None = 0
        batches = 0
        while start is not None:
            batch = await reader.export_columns("btc_usd", lower=start, upper=MAX_TS, limit=10)
            table = table_of("btc_usd", batch.lines)
            assert table.num_rows == batch.rows
            seen.extend(table.column("ts").to_pylist())
            start = batch.next_ts
            batches += 1
        # Two full batches, a last one of 5: no empty batch after it.
        assert (batches, seen) == (3, list(range(100, 125)))
        whole = table_of(
            "btc_usd", (await reader.export_columns("btc_usd", lower=0, upper=MAX_TS, limit=100)).lines
        )
        assert whole.column("price_text").to_pylist() == [str(p.price) for p in prices]
        assert whole.column("source").to_pylist() == [p.source for p in prices]
        # A full batch that reaches `upper` is the last one.
        last = await reader.export_columns("btc_usd", lower=100, upper=109, limit=10)
        assert (last.rows, last.next_ts) == (10, None)
        full = await reader.export_columns("btc_usd", lower=100, upper=MAX_TS, limit=10)
        assert (full.rows, full.next_ts) == (10, 110)
        empty = await reader.export_columns("btc_usd", lower=125, upper=MAX_TS, limit=10)
        assert (empty.lines, empty.rows, empty.next_ts) == (b"", 0, None)


def test_api_processes_load_pyarrow_without_numpy_or_pandas() -> None:
    """As in the production image, which installs neither: some 50 MB less per process."""
    probe = """
import sys
from crypto_client.api.arrow import load_pyarrow
load_pyarrow()
import pyarrow as pa
from crypto_client.export.parquet import SCHEMA, ParquetStream, table_of
from crypto_client.export.quality import measure_day
stream = ParquetStream("btc_usd")
stream.add(b"60,1.5,poll\\n0,2.5,stream\\n")
stream.finish()
day = pa.concat_tables([table_of("btc_usd", b"0,1.5,poll\\n"), SCHEMA.empty_table()])
measure_day(day, 0, 60, (0, 60), None)
print("numpy" in sys.modules, "pandas" in sys.modules, pa.default_memory_pool().backend_name)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "system"]
