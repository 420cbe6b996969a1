"""`/quality`: per UTC day, how complete and how plausible a ticker's stored history is."""

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from crypto_client import exact_json
from crypto_client.api.arrow import load_pyarrow
from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import require_known
from crypto_client.api.pagination import decode_cursor, next_page_link
from crypto_client.api.responses import INVALID, PAGED, UNAVAILABLE, UNKNOWN, JSONBytes
from crypto_client.api.schemas import QualityOut, QualityQuery
from crypto_client.domain import DAY_SECONDS, MAX_TS

router = APIRouter()


@router.get(
    "/quality",
    response_model=QualityOut,
    responses={
        200: {**PAGED, "description": "The UTC days oldest first, paged by Link."},
        **UNKNOWN,
        **INVALID,
        **UNAVAILABLE,
    },
    summary="Per UTC day: expected, stored and missing slots, the longest gap, the largest jumps",
)
async def quality(
    request: Request,
    query: Annotated[QualityQuery, Query()],
    database: ReadDatabaseDep,
    settings: SettingsDep,
) -> JSONBytes:
    # pyarrow costs some 50 MB in every API process: only one that answers this loads it.
    load_pyarrow()
    from crypto_client.export.quality import report_day, span_of

    interval = settings.ingest_interval_seconds
    lower = query.from_ts or 0
    upper = MAX_TS if query.to_ts is None else query.to_ts
    async with database.reader() as reader:
        await require_known(reader, settings, query.ticker)
    span = await span_of(database.reader, query.ticker, interval, lower, upper, time.time())
    days = []
    following = None
    if span.first_day is not None:
        first_day = span.first_day
        if query.cursor is not None:
            first_day = max(first_day, decode_cursor(query.cursor))
        last_day = min(span.last_day, first_day + (query.limit - 1) * DAY_SECONDS)
        for day_start in range(first_day, last_day + 1, DAY_SECONDS):
            _rows, figures = await report_day(
                database.reader, query.ticker, interval, span, day_start, lower, upper
            )
            days.append(figures)
        if last_day < span.last_day:
            following = last_day + DAY_SECONDS
    body = {"ticker": query.ticker, "interval_seconds": interval, "days": days}
    headers = next_page_link(request, query.ticker, following) if following is not None else None
    return JSONBytes(exact_json.dumps(body), headers=headers)
