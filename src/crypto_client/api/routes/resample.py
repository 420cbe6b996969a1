"""`/prices/resample`: an equidistant grid of a ticker's prices with an explicit gap policy."""

from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from crypto_client import exact_json
from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import require_known
from crypto_client.api.pagination import decode_cursor, next_page_link
from crypto_client.api.responses import INVALID, PAGED, UNAVAILABLE, UNKNOWN, JSONBytes
from crypto_client.api.schemas import CANDLE_SECONDS, WEEK_ORIGIN, ResampleOut, ResampleQuery
from crypto_client.db.resample import Bucket, ResampleReader
from crypto_client.domain import MAX_TS

router = APIRouter()


def _bucket_of(ts: int, size: int, origin: int) -> int:
    return ts - (ts - origin) % size


def _stored(bucket: Bucket) -> dict[str, Any]:
    return {
        "ts": bucket.ts,
        "price": bucket.price,
        "count": bucket.rows,
        "backfilled": bucket.backfilled,
        "trade": bucket.trade,
        "filled": False,
    }


def _grid(
    stored: list[Bucket], first: int, last: int, size: int, carry: Decimal | None, fill: str
) -> list[dict[str, Any]]:
    """Every bucket from `first` to `last`: the stored ones as they are, the empty ones
    filled by the policy (`carry`: the last price before `first`, for fill=prev)."""
    by_ts = {bucket.ts: bucket for bucket in stored}
    body = []
    for ts in range(first, last + 1, size):
        found = by_ts.get(ts)
        if found is not None:
            body.append(_stored(found))
            carry = found.price
        else:
            price = carry if fill == "prev" else None
            body.append({"ts": ts, "price": price, "count": 0, "backfilled": 0, "trade": 0, "filled": True})
    return body


@router.get(
    "/prices/resample",
    response_model=list[ResampleOut],
    responses={200: PAGED, **UNKNOWN, **INVALID, **UNAVAILABLE},
    summary="One bucket per interval over the bounds: the last price in each, with a fill policy, paged",
)
async def resample(
    request: Request,
    query: Annotated[ResampleQuery, Query()],
    database: ReadDatabaseDep,
    settings: SettingsDep,
) -> JSONBytes:
    size = CANDLE_SECONDS[query.interval]
    origin = WEEK_ORIGIN if query.interval == "1w" else 0
    lower = query.from_ts or 0
    upper = MAX_TS if query.to_ts is None else query.to_ts
    resume = decode_cursor(query.cursor) if query.cursor is not None else None
    async with database.reader() as reader:
        await require_known(reader, settings, query.ticker)
        buckets = ResampleReader(reader.connection)
        following: int | None = None
        if query.fill == "none":
            first_row = await reader.first_ts(query.ticker, max(lower, resume or 0), upper)
            if first_row is None:
                return JSONBytes(b"[]")
            # A page is the time of `limit` buckets from the first row on: it reads only those rows.
            window_end = min(upper, _bucket_of(first_row, size, origin) + query.limit * size - 1)
            found = await buckets.buckets(query.ticker, size, origin, first_row, window_end)
            body = [_stored(bucket) for bucket in found]
            if window_end < upper:
                following = await reader.first_ts(query.ticker, window_end + 1, upper)
        else:
            # The grid spans the bounds; an open bound ends at the first or last stored row.
            if resume is not None:
                start = resume
            elif query.from_ts is not None:
                start = _bucket_of(query.from_ts, size, origin)
            else:
                first_row = await reader.first_ts(query.ticker, 0, upper)
                if first_row is None:
                    return JSONBytes(b"[]")
                start = _bucket_of(first_row, size, origin)
            end = upper
            if query.to_ts is None:
                newest = await reader.latest(query.ticker)
                if newest is None:
                    return JSONBytes(b"[]")
                end = newest.ts
            if start > end:
                return JSONBytes(b"[]")
            window_end = min(end, start + query.limit * size - 1)
            rows_from = max(start, lower)
            found = await buckets.buckets(query.ticker, size, origin, rows_from, window_end)
            carry = None
            if query.fill == "prev":
                before = await reader.at(query.ticker, rows_from - 1) if rows_from > 0 else None
                carry = None if before is None else before.price
            body = _grid(found, start, _bucket_of(window_end, size, origin), size, carry, query.fill)
            if window_end < end:
                following = window_end + 1
    headers = next_page_link(request, query.ticker, following) if following is not None else None
    return JSONBytes(exact_json.dumps(body), headers=headers)
