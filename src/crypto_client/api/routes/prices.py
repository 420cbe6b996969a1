"""Stored prices: pages, the newest, as of a moment, and several tickers at once."""

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from crypto_client.api.deps import LatestCacheDep, ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import NoPriceError, require_known
from crypto_client.api.freshness import fresh_until, with_age
from crypto_client.api.pagination import decode_cursor, invalid_parameter, next_page_link
from crypto_client.api.responses import (
    INVALID,
    PAGED,
    UNAVAILABLE,
    UNKNOWN,
    JSONBytes,
    json_response,
    not_found,
)
from crypto_client.api.schemas import (
    AtQuery,
    LatestOut,
    PageQuery,
    PriceOut,
    RangeQuery,
    SnapshotOut,
    SnapshotQuery,
    TickerQuery,
)
from crypto_client.domain import PriceRow

router = APIRouter()
# Routes whose parameters may repeat by design (`/prices/snapshot?ticker=a&ticker=b`).
repeatable_router = APIRouter()


async def _page(
    request: Request,
    database: ReadDatabaseDep,
    settings: SettingsDep,
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
        if page.rows == 0:
            await require_known(reader, settings, ticker)
    headers = next_page_link(request, ticker, page.next_ts) if page.next_ts is not None else None
    return JSONBytes(page.json.encode(), headers=headers)


@router.get(
    "/prices",
    response_model=list[PriceOut],
    responses={200: PAGED, **UNKNOWN, **INVALID, **UNAVAILABLE},
    summary="Stored prices of a ticker, oldest first, paged",
)
async def list_prices(
    request: Request, query: Annotated[PageQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> JSONBytes:
    return await _page(
        request, database, settings, query.ticker, limit=query.limit, offset=query.offset, cursor=query.cursor
    )


@router.get(
    "/prices/latest",
    response_model=LatestOut,
    responses={
        **not_found(
            "An unknown ticker, or no price stored for it yet (rows dated in the future do not count)."
        ),
        **INVALID,
        **UNAVAILABLE,
    },
    summary="The most recent price of a ticker",
)
async def latest_price(
    query: Annotated[TickerQuery, Query()],
    database: ReadDatabaseDep,
    settings: SettingsDep,
    cache: LatestCacheDep,
) -> JSONBytes:
    async def load() -> PriceRow | None:
        async with database.reader() as reader:
            return await reader.latest(query.ticker, not_after=fresh_until(time.time()))

    row = await cache.get(query.ticker, load)
    if row is None:
        async with database.reader() as reader:
            await require_known(reader, settings, query.ticker)
        raise NoPriceError.yet(query.ticker)
    return json_response(with_age(row, time.time()))


@router.get(
    "/prices/range",
    response_model=list[PriceOut],
    responses={200: PAGED, **UNKNOWN, **INVALID, **UNAVAILABLE},
    summary="Prices of a ticker with from_ts <= ts <= to_ts, oldest first, paged",
)
async def price_range(
    request: Request, query: Annotated[RangeQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> JSONBytes:
    return await _page(
        request,
        database,
        settings,
        query.ticker,
        limit=query.limit,
        cursor=query.cursor,
        from_ts=query.from_ts,
        to_ts=query.to_ts,
    )


@router.get(
    "/prices/at",
    response_model=LatestOut,
    responses={
        **not_found("An unknown ticker, no row at or before ts, or only one older than max_age_seconds."),
        **INVALID,
        **UNAVAILABLE,
    },
    summary="The last price at or before a moment (as-of lookup)",
)
async def price_at(
    query: Annotated[AtQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> JSONBytes:
    async with database.reader() as reader:
        row = await reader.at(query.ticker, query.ts)
        if row is None:
            await require_known(reader, settings, query.ticker)
    if row is None:
        raise NoPriceError.at(query.ticker, query.ts)
    age = query.ts - row.ts
    if query.max_age_seconds is not None and age > query.max_age_seconds:
        raise NoPriceError.too_old(query.ticker, query.ts, row.ts, query.max_age_seconds)
    return json_response({**row._asdict(), "age_seconds": age})


@repeatable_router.get(
    "/prices/snapshot",
    response_model=list[SnapshotOut],
    responses={**UNKNOWN, **INVALID, **UNAVAILABLE},
    summary="The latest price of several tickers in one call (nulls for a known ticker without data)",
)
async def snapshot(
    query: Annotated[SnapshotQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> JSONBytes:
    tickers = query.ticker or list(settings.tickers)
    now = time.time()
    async with database.reader() as reader:
        latest = await reader.latest_of(tickers, not_after=fresh_until(now))
        for ticker in tickers:
            if ticker not in latest:
                await require_known(reader, settings, ticker)
    empty = {"price": None, "ts": None, "source": None, "age_seconds": None}
    return json_response(
        [with_age(latest[t], now) if t in latest else {"ticker": t, **empty} for t in tickers]
    )
