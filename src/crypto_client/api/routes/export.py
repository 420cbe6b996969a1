"""A ticker's prices in a range as a CSV, NDJSON or Parquet file, streamed in keyset batches."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

import structlog
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from crypto_client import exact_json
from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import require_known
from crypto_client.api.limits import ExportSlot
from crypto_client.api.responses import INVALID, UNAVAILABLE, UNKNOWN
from crypto_client.api.schemas import ExportQuery
from crypto_client.db.pages import CSV_HEADER, ExportFormat, TextPage
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
# Parquet's batches are only parsed, never sent as they are: larger ones cost fewer queries,
# and half a row group keeps the memory of one in flight small.
PARQUET_BATCH_ROWS = 50_000

router = APIRouter()


def _parquet_stream() -> "ParquetStream":
    # pyarrow costs some 50 MB in every API process: only one that exports Parquet loads it.
    from crypto_client.export.parquet import ParquetStream

    return ParquetStream()


async def _prefetched(
    read_batch: Callable[[int], Awaitable[TextPage]], lower: int
) -> AsyncIterator[TextPage]:
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
) -> StreamingResponse:
    lower, upper = query.from_ts or 0, MAX_TS if query.to_ts is None else query.to_ts
    async with database.reader() as reader:
        await require_known(reader, settings, query.ticker)

    # Parquet is made from the CSV batches (the database's exact price text).
    parquet = _parquet_stream() if query.format == "parquet" else None
    batch_format: ExportFormat = "csv" if query.format == "parquet" else query.format
    batch_rows = PARQUET_BATCH_ROWS if query.format == "parquet" else EXPORT_BATCH_ROWS

    async def read_batch(start: int) -> TextPage:
        async with database.reader() as reader:
            return await reader.export_batch(
                query.ticker, batch_format, lower=start, upper=upper, limit=batch_rows
            )

    async def batches() -> AsyncIterator[str | bytes]:
        # Keyset batches, each on a connection of its own: memory stays bounded whatever the
        # range, and a client that leaves stops the export between two batches.
        start: int | None = lower
        rows_sent = 0
        if query.format == "csv":
            yield CSV_HEADER + "\n"
        try:
            async for page in _prefetched(read_batch, lower):
                if parquet is not None:
                    # Whole row groups only: `add` keeps smaller batches for the next one. It
                    # runs in a thread (pyarrow releases the GIL) while the database renders
                    # the next batch: the two take the machine's cores side by side.
                    groups = await asyncio.to_thread(parquet.add, page.text) if page.text else b""
                    if groups:
                        yield groups
                elif page.text:
                    yield page.text + "\n"
                rows_sent += page.rows
                start = page.next_ts
            if parquet is not None:
                # The footer: without it (a cut body) no reader takes the file for whole.
                yield await asyncio.to_thread(parquet.finish)
        except Exception as exc:
            # The status line (200) is long sent: what is left is to end the body so that no
            # client takes it for the whole file. NDJSON gets an error line a line reader
            # sees; then the exception aborts the chunked body (no final zero-length chunk),
            # which every HTTP/1.1 client reports as an incomplete read.
            log.error(
                "export cut short",
                ticker=query.ticker,
                format=query.format,
                from_ts=lower,
                to_ts=upper,
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

    extension, media_type = _EXPORT_TYPES[query.format]
    name = f"{query.ticker}_{lower}_{query.to_ts if query.to_ts is not None else 'now'}.{extension}"
    return StreamingResponse(
        batches(),
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
