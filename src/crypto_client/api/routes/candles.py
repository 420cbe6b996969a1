"""OHLC candles of a ticker's stored prices."""

from typing import Annotated

from fastapi import APIRouter, Query, Request

from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import require_known
from crypto_client.api.pagination import decode_cursor, next_page_link
from crypto_client.api.responses import INVALID, PAGED, UNAVAILABLE, UNKNOWN, JSONBytes, json_response
from crypto_client.api.schemas import CANDLE_SECONDS, WEEK_ORIGIN, CandleOut, CandleQuery
from crypto_client.domain import MAX_TS

router = APIRouter()


@router.get(
    "/prices/candles",
    response_model=list[CandleOut],
    responses={200: PAGED, **UNKNOWN, **INVALID, **UNAVAILABLE},
    summary="OHLC candles of a ticker's stored prices, oldest first, paged",
)
async def candles(
    request: Request, query: Annotated[CandleQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> JSONBytes:
    size = CANDLE_SECONDS[query.interval]
    origin = WEEK_ORIGIN if query.interval == "1w" else 0
    lower = max(query.from_ts or 0, decode_cursor(query.cursor) if query.cursor is not None else 0)
    upper = MAX_TS if query.to_ts is None else query.to_ts
    async with database.reader() as reader:
        first = await reader.first_ts(query.ticker, lower, upper)
        if first is None:
            await require_known(reader, settings, query.ticker)
            return json_response([])
        # A page is the time of `limit` buckets from the first row on: it reads only those rows.
        window_end = min(upper, first - (first - origin) % size + query.limit * size - 1)
        found = await reader.candles(query.ticker, size, origin, first, window_end)
        following = await reader.first_ts(query.ticker, window_end + 1, upper) if window_end < upper else None
    body = [
        {
            "ts": c.ts,
            "open": c.open,
            "high": c.high,
            "low": c.low,
            "close": c.close,
            "count": c.rows,
            "backfilled": c.backfilled,
        }
        for c in found
    ]
    headers = next_page_link(request, query.ticker, following) if following is not None else None
    return json_response(body, headers=headers)
