"""The read-only endpoints."""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from crypto_client import exact_json
from crypto_client.api.deps import LatestCacheDep, ReadDatabaseDep, SettingsDep, reject_repeated_parameters
from crypto_client.api.pagination import decode_cursor, invalid_parameter, next_page_link
from crypto_client.api.schemas import (
    ErrorOut,
    HealthOut,
    PageQuery,
    PriceOut,
    RangeQuery,
    TickerOut,
    TickerQuery,
    ValidationErrorOut,
)
from crypto_client.db.engine import is_database_unavailable

HEALTH_TIMEOUT_SECONDS = 1.0

_INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": ValidationErrorOut, "description": "A parameter is missing, unknown or invalid."}
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "The database cannot be reached."}
}
_PAGED: dict[str, Any] = {
    "description": 'Rows oldest first. A `Link: <...>; rel="next"` header is present when more rows follow.',
    "headers": {"Link": {"description": "RFC 8288 link to the next page.", "schema": {"type": "string"}}},
}

router = APIRouter(dependencies=[Depends(reject_repeated_parameters)])


class JSONBytes(Response):
    media_type = "application/json"


def _json(payload: Any) -> JSONBytes:
    return JSONBytes(exact_json.dumps(payload))


async def _page(
    request: Request,
    database: ReadDatabaseDep,
    ticker: str,
    *,
    limit: int,
    offset: int = 0,
    cursor: str | None = None,
    from_ts: int | None = None,
    to_ts: int | None = None,
) -> JSONBytes:
    if cursor is not None and offset:
        raise invalid_parameter("cursor", "cannot be combined with offset: use one of them")
    start_ts = decode_cursor(cursor) if cursor is not None else None
    async with database.reader() as reader:
        page = await reader.page_json(
            ticker, limit=limit, offset=offset, start_ts=start_ts, from_ts=from_ts, to_ts=to_ts
        )
    headers = next_page_link(request, ticker, page.next_ts) if page.next_ts is not None else None
    return JSONBytes(page.json.encode(), headers=headers)


@router.get(
    "/prices",
    response_model=list[PriceOut],
    responses={200: _PAGED, **_INVALID, **_UNAVAILABLE},
    summary="Stored prices of a ticker, oldest first, paged",
)
async def list_prices(
    request: Request, query: Annotated[PageQuery, Query()], database: ReadDatabaseDep
) -> JSONBytes:
    return await _page(
        request, database, query.ticker, limit=query.limit, offset=query.offset, cursor=query.cursor
    )


@router.get(
    "/prices/latest",
    response_model=PriceOut,
    responses={
        404: {"model": ErrorOut, "description": "No price stored for this ticker yet."},
        **_INVALID,
        **_UNAVAILABLE,
    },
    summary="The most recent price of a ticker",
)
async def latest_price(
    query: Annotated[TickerQuery, Query()], database: ReadDatabaseDep, cache: LatestCacheDep
) -> JSONBytes:
    body = cache.get(query.ticker)
    if body is None:
        async with database.reader() as reader:
            row = await reader.latest(query.ticker)
        if row is None:
            raise HTTPException(status_code=404, detail=f"no price stored for ticker {query.ticker!r} yet")
        body = exact_json.dumps(row._asdict())
        cache.put(query.ticker, body)
    return JSONBytes(body)


@router.get(
    "/prices/range",
    response_model=list[PriceOut],
    responses={200: _PAGED, **_INVALID, **_UNAVAILABLE},
    summary="Prices of a ticker with from_ts <= ts <= to_ts, oldest first, paged",
)
async def price_range(
    request: Request, query: Annotated[RangeQuery, Query()], database: ReadDatabaseDep
) -> JSONBytes:
    return await _page(
        request,
        database,
        query.ticker,
        limit=query.limit,
        cursor=query.cursor,
        from_ts=query.from_ts,
        to_ts=query.to_ts,
    )


@router.get(
    "/tickers",
    response_model=list[TickerOut],
    responses={**_INVALID, **_UNAVAILABLE},
    summary="Configured and stored tickers with their row counts and time spans",
)
async def list_tickers(database: ReadDatabaseDep, settings: SettingsDep) -> JSONBytes:
    async with database.reader() as reader:
        stats = {row.ticker: row for row in await reader.ticker_stats()}
    body = []
    for ticker in sorted(set(stats) | set(settings.tickers)):
        row = stats.get(ticker)
        body.append(
            {
                "ticker": ticker,
                "configured": ticker in settings.tickers,
                "rows": row.rows if row else 0,
                "first_ts": row.first_ts if row else None,
                "last_ts": row.last_ts if row else None,
            }
        )
    return _json(body)


@router.get(
    "/health",
    response_model=HealthOut,
    responses={**_INVALID, 503: {"model": HealthOut, "description": "The database did not answer."}},
    summary="200 when the database answers a SELECT 1 within a second, else 503",
)
async def health(database: ReadDatabaseDep) -> JSONBytes:
    problem = "unreachable"
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
            # Two tries: the first may only discover that a restart broke the pooled
            # connections (which invalidates them); the second then connects afresh.
            for attempt in (1, 2):
                try:
                    async with database.reader(queued=False) as reader:
                        await reader.ping()
                    return _json({"status": "ok", "database": "ok"})
                except Exception as exc:  # any failure to reach the database is what this reports
                    problem = (
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreachable'}"
                    )
                    if attempt == 2 or not is_database_unavailable(exc):
                        break
    except TimeoutError:
        problem = f"no answer within {HEALTH_TIMEOUT_SECONDS:g}s"
    response = _json({"status": "unavailable", "database": problem})
    response.status_code = 503
    return response
