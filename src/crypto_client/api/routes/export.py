"""A ticker's prices in a range as a CSV, NDJSON or Parquet file, streamed in keyset batches."""

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Annotated, Protocol, TypeVar

import structlog
from fastapi import APIRouter, Query

from crypto_client import exact_json
from crypto_client.api.arrow import load_pyarrow
from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import require_known
from crypto_client.api.limits import ExportSlot
from crypto_client.api.responses import INVALID, UNAVAILABLE, UNKNOWN, ClosingStreamingResponse
from crypto_client.api.schemas import ExportQuery
from crypto_client.db.pages import CSV_HEADER, ColumnBatch, ExportFormat, TextPage
from crypto_client.domain import MAX_TS

if TYPE_CHECKING:
    from crypto_client.export.parquet import ParquetStream

log = structlog.get_logger(__name__)

_EXPORT_TYPES = {
    "csv": ("csv", "text/csv"),
    "ndjson": ("ndjson", "application/x-ndjson"),
    "parquet": ("parquet", "application/vnd.apache.parquet"),
}

EXPORT_BATCH_ROWS = 10_000

router = APIRouter()


class _Batch(Protocol):
    @property
    def next_ts(self) -> int | None: ...


_B = TypeVar("_B", bound=_Batch)


def _parquet_stream(ticker: str) -> "tuple[ParquetStream, int]":
    """A Parquet file of `ticker`'s rows, and the rows of the batches it takes (a row group
    each). pyarrow costs some 50 MB in every API process: only one that exports Parquet
    loads it."""
    load_pyarrow()
    from crypto_client.export.parquet import BATCH_ROWS, ParquetStream

    return ParquetStream(ticker), BATCH_ROWS


async def _prefetched(read_batch: Callable[[int], Awaitable[_B]], lower: int) -> AsyncGenerator[_B, None]:
    """The keyset batches from `lower` on, each asked for as soon as the one before it is
    read, so that the database renders it while the caller handles its predecessor. One batch
    ahead at most: memory stays bounded. A caller that stops cancels the read ahead."""
    ahead = asyncio.ensure_future(read_batch(lower))
    try:
        while True:
            page = await ahead
            if page.next_ts is not None:
                ahead = asyncio.ensure_future(read_batch(page.next_ts))
            yield page
            if page.next_ts is None:
                return
    finally:
        ahead.cancel()
        # Collects the read's outcome, whatever it was: no "exception never retrieved".
        await asyncio.gather(ahead, return_exceptions=True)


@router.get(
    "/prices/export",
    dependencies=[ExportSlot],
    responses={
        200: {
            "description": "The whole range as a file, streamed oldest first.",
            "content": {"text/csv": {}, "application/x-ndjson": {}, "application/vnd.apache.parquet": {}},
        },
        **UNKNOWN,
        **INVALID,
        **UNAVAILABLE,
    },
    summary="A ticker's prices in a range as CSV, NDJSON or Parquet, streamed",
)
async def export(
    query: Annotated[ExportQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> ClosingStreamingResponse:
    lower, upper = query.from_ts or 0, MAX_TS if query.to_ts is None else query.to_ts
    async with database.reader() as reader:
        await require_known(reader, settings, query.ticker)

    # Parquet is made from column batches (`ts,price,source` lines, the database's exact price
    # text), a row group each; CSV and NDJSON are sent as the database renders them.
    parquet, batch_rows = _parquet_stream(query.ticker) if query.format == "parquet" else (None, 0)
    text_format: ExportFormat = "ndjson" if query.format == "ndjson" else "csv"

    async def read_text(start: int) -> TextPage:
        async with database.reader() as reader:
            return await reader.export_batch(
                query.ticker, text_format, lower=start, upper=upper, limit=EXPORT_BATCH_ROWS
            )

    async def read_columns(start: int) -> ColumnBatch:
        async with database.reader() as reader:
            return await reader.export_columns(query.ticker, lower=start, upper=upper, limit=batch_rows)

    async def parts() -> AsyncGenerator[tuple[str | bytes, int, int | None], None]:
        """The body's parts, each with its rows and where the rows after it start."""
        if parquet is None:
            async with aclosing(_prefetched(read_text, lower)) as pages:
                async for page in pages:
                    yield (page.text + "\n" if page.text else ""), page.rows, page.next_ts
            return
        async with aclosing(_prefetched(read_columns, lower)) as batches:
            async for batch in batches:
                # A row group a batch. It is made in a thread (pyarrow releases the GIL) while
                # the database renders the next batch: the two take the machine's cores side
                # by side.
                group = await asyncio.to_thread(parquet.add, batch.lines) if batch.rows else b""
                yield group, batch.rows, batch.next_ts
        # The footer: without it (a cut body) no reader takes the file for whole.
        yield await asyncio.to_thread(parquet.finish), 0, None

    async def body() -> AsyncGenerator[str | bytes, None]:
        # Keyset batches, each on a connection of its own: memory stays bounded whatever the
        # range, and a client that leaves stops the export between two batches.
        start: int | None = lower
        rows_sent = 0
        export_log = log.bind(ticker=query.ticker, format=query.format, from_ts=lower, to_ts=upper)
        if query.format == "csv":
            yield CSV_HEADER + "\n"
        try:
            async with aclosing(parts()) as pieces:
                async for data, rows, next_ts in pieces:
                    if data:
                        yield data
                    rows_sent += rows
                    start = next_ts
        except Exception as exc:
            # The status line (200) is long sent: what is left is to end the body so that no
            # client takes it for the whole file. NDJSON gets an error line a line reader
            # sees; then the exception aborts the chunked body (no final zero-length chunk),
            # which every HTTP/1.1 client reports as an incomplete read.
            export_log.error(
                "export cut short",
                rows_sent=rows_sent,
                resume_from_ts=start,
                error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            )
            if query.format == "ndjson":
                problem = {
                    "error": f"export incomplete after {rows_sent} rows: the database could not be read;"
                    f" request from_ts={start} to continue",
                    "rows_sent": rows_sent,
                    "resume_from_ts": start,
                }
                yield exact_json.dumps(problem).decode() + "\n"
            raise
        except (GeneratorExit, asyncio.CancelledError):
            if start is not None:
                export_log.info("export stopped: the client left", rows_sent=rows_sent, resume_from_ts=start)
            raise

    extension, media_type = _EXPORT_TYPES[query.format]
    name = f"{query.ticker}_{lower}_{query.to_ts if query.to_ts is not None else 'now'}.{extension}"
    return ClosingStreamingResponse(
        body(),
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
