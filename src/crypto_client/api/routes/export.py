"""A ticker's prices in a range as a CSV or NDJSON file, streamed in keyset batches."""

from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from crypto_client import exact_json
from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import require_known
from crypto_client.api.limits import ExportSlot
from crypto_client.api.responses import INVALID, UNAVAILABLE, UNKNOWN
from crypto_client.api.schemas import ExportQuery
from crypto_client.db.pages import CSV_HEADER
from crypto_client.domain import MAX_TS

log = structlog.get_logger(__name__)

EXPORT_BATCH_ROWS = 10_000

router = APIRouter()


@router.get(
    "/prices/export",
    dependencies=[ExportSlot],
    responses={
        200: {
            "description": "The whole range as a file, streamed oldest first.",
            "content": {"text/csv": {}, "application/x-ndjson": {}},
        },
        **UNKNOWN,
        **INVALID,
        **UNAVAILABLE,
    },
    summary="A ticker's prices in a range as CSV or NDJSON, streamed",
)
async def export(
    query: Annotated[ExportQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> StreamingResponse:
    lower, upper = query.from_ts or 0, MAX_TS if query.to_ts is None else query.to_ts
    async with database.reader() as reader:
        await require_known(reader, settings, query.ticker)

    async def batches() -> AsyncIterator[str]:
        # Keyset batches, each on a connection of its own: memory stays bounded whatever the
        # range, and a client that leaves stops the export between two batches.
        start: int | None = lower
        rows_sent = 0
        if query.format == "csv":
            yield CSV_HEADER + "\n"
        try:
            while start is not None:
                async with database.reader() as reader:
                    page = await reader.export_batch(
                        query.ticker, query.format, lower=start, upper=upper, limit=EXPORT_BATCH_ROWS
                    )
                if page.text:
                    yield page.text + "\n"
                rows_sent += page.rows
                start = page.next_ts
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

    extension, media_type = (
        ("csv", "text/csv") if query.format == "csv" else ("ndjson", "application/x-ndjson")
    )
    name = f"{query.ticker}_{lower}_{query.to_ts if query.to_ts is not None else 'now'}.{extension}"
    return StreamingResponse(
        batches(),
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
