"""The read-only endpoints."""

import asyncio
import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import URL

from crypto_client import exact_json
from crypto_client.api.deps import (
    LatestCacheDep,
    ReadDatabaseDep,
    ReaderDep,
    SettingsDep,
    reject_repeated_parameters,
)
from crypto_client.api.schemas import (
    MAX_TS,
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
from crypto_client.db.repository import PriceReader

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


def _invalid(parameter: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", parameter), "msg": message, "type": "value_error"}])


def encode_cursor(ts: int) -> str:
    return base64.urlsafe_b64encode(f"ts:{ts}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = text.partition(":")
        if prefix != "ts" or not value.isdigit() or int(value) > MAX_TS:
            raise ValueError(cursor)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _invalid("cursor", "not a valid cursor: pass the one from a Link header unchanged") from None


async def _page(
    request: Request,
    reader: PriceReader,
    ticker: str,
    *,
    limit: int,
    offset: int = 0,
    cursor: str | None = None,
    from_ts: int | None = None,
    to_ts: int | None = None,
) -> JSONBytes:
    if cursor is not None and offset:
        raise _invalid("cursor", "cannot be combined with offset: use one of them")
    start_ts = decode_cursor(cursor) if cursor is not None else None
    page = await reader.page_json(
        ticker, limit=limit, offset=offset, start_ts=start_ts, from_ts=from_ts, to_ts=to_ts
    )
    headers = None
    if page.next_ts is not None:
        query = {k: v for k, v in request.query_params.items() if k not in ("offset", "cursor")}
        query.update(ticker=ticker, cursor=encode_cursor(page.next_ts))
        next_url = URL(path=request.url.path).include_query_params(**query)
        headers = {"Link": f'<{next_url}>; rel="next"'}
    return JSONBytes(page.json.encode(), headers=headers)


@router.get(
    "/prices",
    response_model=list[PriceOut],
    responses={200: _PAGED, **_INVALID, **_UNAVAILABLE},
    summary="Stored prices of a ticker, oldest first, paged",
)
async def list_prices(request: Request, query: Annotated[PageQuery, Query()], reader: ReaderDep) -> JSONBytes:
    return await _page(
        request, reader, query.ticker, limit=query.limit, offset=query.offset, cursor=query.cursor
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
        async with database.connect() as connection:
            tick = await PriceReader(connection).latest(query.ticker)
        if tick is None:
            raise HTTPException(status_code=404, detail=f"no price stored for ticker {query.ticker!r} yet")
        body = exact_json.dumps({"ticker": tick.ticker, "price": tick.price, "ts": tick.ts})
        cache.put(query.ticker, body)
    return JSONBytes(body)


@router.get(
    "/prices/range",
    response_model=list[PriceOut],
    responses={200: _PAGED, **_INVALID, **_UNAVAILABLE},
    summary="Prices of a ticker with from_ts <= ts <= to_ts, oldest first, paged",
)
async def price_range(
    request: Request, query: Annotated[RangeQuery, Query()], reader: ReaderDep
) -> JSONBytes:
    return await _page(
        request,
        reader,
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
async def list_tickers(reader: ReaderDep, settings: SettingsDep) -> JSONBytes:
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
                    # Straight to the engine, not behind queued requests: this asks whether
                    # the database answers, not how busy the API is.
                    async with database.engine.connect() as connection:
                        await PriceReader(connection).ping()
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
