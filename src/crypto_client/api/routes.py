"""The read-only endpoints."""

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from crypto_client import exact_json, metrics
from crypto_client.api import live
from crypto_client.api.deps import LatestCacheDep, ReadDatabaseDep, SettingsDep, reject_repeated_parameters
from crypto_client.api.errors import require_known as _require_known
from crypto_client.api.pagination import decode_cursor, invalid_parameter, next_page_link
from crypto_client.api.responses import INVALID as _INVALID
from crypto_client.api.responses import PAGED as _PAGED
from crypto_client.api.responses import UNAVAILABLE as _UNAVAILABLE
from crypto_client.api.responses import UNKNOWN as _UNKNOWN
from crypto_client.api.responses import JSONBytes
from crypto_client.api.schemas import (
    CANDLE_SECONDS,
    WEEK_ORIGIN,
    AtQuery,
    CandleOut,
    CandleQuery,
    CoverageOut,
    CoverageQuery,
    ErrorOut,
    ExportQuery,
    HealthOut,
    LatestOut,
    PageQuery,
    PriceOut,
    RangeQuery,
    ReadinessOut,
    SnapshotOut,
    SnapshotQuery,
    TickerOut,
    TickerQuery,
)
from crypto_client.config import Settings
from crypto_client.coverage import measure
from crypto_client.db.engine import is_database_unavailable
from crypto_client.db.repository import CSV_HEADER, ExportFormat, PriceReader
from crypto_client.domain import MAX_TS, PriceRow

if TYPE_CHECKING:
    from crypto_client.export.parquet import ParquetStream

log = structlog.get_logger(__name__)

EXPORT_BATCH_ROWS = 10_000
_EXPORT_TYPES = {
    "csv": ("csv", "text/csv"),
    "ndjson": ("ndjson", "application/x-ndjson"),
    "parquet": ("parquet", "application/vnd.apache.parquet"),
}

COVERAGE_WINDOW_SECONDS = 86_400

HEALTH_TIMEOUT_SECONDS = 1.0

# A comment line this often keeps proxies from closing a quiet stream.
STREAM_PING_SECONDS = 15
# A client whose connection accepts nothing for this long is gone.
STREAM_SEND_TIMEOUT_SECONDS = 30
# A `seq`: what an SSE `id` of this API can be; anything else is refused, not guessed at.
_LAST_EVENT_ID = re.compile(r"[0-9]{1,19}")
_MAX_SEQ = 2**63 - 1

# How far a row's `ts` may lie ahead of this process's clock and still count as the newest
# price (clocks of the writing and the reading hosts differ a little). A row further ahead is
# not "now": it must not pin the newest price at age 0 while nothing is stored any more.
FUTURE_TS_TOLERANCE_SECONDS = 5

router = APIRouter(dependencies=[Depends(reject_repeated_parameters)])
# Routes whose parameters may repeat by design (`/prices/snapshot?ticker=a&ticker=b`).
repeatable_router = APIRouter()


def _json(payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONBytes:
    return JSONBytes(exact_json.dumps(payload), status_code=status_code, headers=headers)


def _age(ts: int, now: float) -> int:
    return max(0, int(now) - ts)


def _with_age(row: PriceRow, now: float) -> dict[str, Any]:
    return {**row._asdict(), "age_seconds": _age(row.ts, now)}


def _fresh_until(now: float) -> int:
    """The newest `ts` that counts as a current price at `now`."""
    return int(now) + FUTURE_TS_TOLERANCE_SECONDS


def _resume_point(last_event_id: str | None) -> int | None:
    """The `seq` a client resumes after, from its `Last-Event-ID` (empty: none, as an
    EventSource whose last event had no id would send it)."""
    if last_event_id is None or last_event_id == "":
        return None
    if _LAST_EVENT_ID.fullmatch(last_event_id) is None or int(last_event_id) > _MAX_SEQ:
        raise HTTPException(
            status_code=400,
            detail=f"Last-Event-ID {last_event_id[:40]!r} is not an id this stream sent: "
            f"send the `id` of the last event received (an integer from 0 to {_MAX_SEQ}), or none",
        )
    return int(last_event_id)


async def _recent_coverage(reader: PriceReader, settings: Settings, ticker: str, now: float) -> float | None:
    """Stored over expected slots in the last 24 hours; None before the ticker is tracked."""
    found = await measure(
        reader, ticker, settings.ingest_interval_seconds, from_ts=int(now) - COVERAGE_WINDOW_SECONDS, now=now
    )
    return None if found.from_ts is None else found.ratio


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
            await _require_known(reader, settings, ticker)
    headers = next_page_link(request, ticker, page.next_ts) if page.next_ts is not None else None
    return JSONBytes(page.json.encode(), headers=headers)


@router.get(
    "/prices",
    response_model=list[PriceOut],
    responses={200: _PAGED, **_UNKNOWN, **_INVALID, **_UNAVAILABLE},
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
        404: {
            "model": ErrorOut,
            "description": "An unknown ticker, or no price stored for it yet (rows dated in the future "
            "do not count).",
        },
        **_INVALID,
        **_UNAVAILABLE,
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
            return await reader.latest(query.ticker, not_after=_fresh_until(time.time()))

    row = await cache.get(query.ticker, load)
    if row is None:
        async with database.reader() as reader:
            await _require_known(reader, settings, query.ticker)
        raise HTTPException(status_code=404, detail=f"no price stored for ticker {query.ticker!r} yet")
    return _json(_with_age(row, time.time()))


@router.get(
    "/prices/range",
    response_model=list[PriceOut],
    responses={200: _PAGED, **_UNKNOWN, **_INVALID, **_UNAVAILABLE},
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
    "/prices/candles",
    response_model=list[CandleOut],
    responses={200: _PAGED, **_UNKNOWN, **_INVALID, **_UNAVAILABLE},
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
            await _require_known(reader, settings, query.ticker)
            return _json([])
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
    return _json(body, headers=headers)


@router.get(
    "/prices/at",
    response_model=LatestOut,
    responses={
        404: {
            "model": ErrorOut,
            "description": "An unknown ticker, no row at or before ts, or only one older than "
            "max_age_seconds.",
        },
        **_INVALID,
        **_UNAVAILABLE,
    },
    summary="The last price at or before a moment (as-of lookup)",
)
async def price_at(
    query: Annotated[AtQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> JSONBytes:
    async with database.reader() as reader:
        row = await reader.at(query.ticker, query.ts)
        if row is None:
            await _require_known(reader, settings, query.ticker)
    if row is None:
        raise HTTPException(
            status_code=404, detail=f"no price of {query.ticker!r} at or before ts={query.ts}"
        )
    age = query.ts - row.ts
    if query.max_age_seconds is not None and age > query.max_age_seconds:
        raise HTTPException(
            status_code=404,
            detail=f"the last price of {query.ticker!r} at or before ts={query.ts} is {age} s old"
            f" (ts={row.ts}), more than max_age_seconds={query.max_age_seconds}",
        )
    return _json({**row._asdict(), "age_seconds": age})


@repeatable_router.get(
    "/prices/snapshot",
    response_model=list[SnapshotOut],
    responses={**_UNKNOWN, **_INVALID, **_UNAVAILABLE},
    summary="The latest price of several tickers in one call (nulls for a known ticker without data)",
)
async def snapshot(
    query: Annotated[SnapshotQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> JSONBytes:
    tickers = query.ticker or list(settings.tickers)
    now = time.time()
    async with database.reader() as reader:
        latest = await reader.latest_of(tickers, not_after=_fresh_until(now))
        for ticker in tickers:
            if ticker not in latest:
                await _require_known(reader, settings, ticker)
    empty = {"price": None, "ts": None, "source": None, "age_seconds": None}
    return _json([_with_age(latest[t], now) if t in latest else {"ticker": t, **empty} for t in tickers])


@repeatable_router.get(
    "/prices/stream",
    responses={
        200: {
            "description": "Server-Sent Events: one `price` event per stored row, its `id` the row's "
            "place in the order rows were stored. A `Last-Event-ID` beyond the newest row (the "
            "database was restored or replaced) first gets a `reset` event whose `id` is the newest "
            "row's: the stream continues from there.",
            "content": {"text/event-stream": {}},
        },
        400: {"model": ErrorOut, "description": "Last-Event-ID is not an id this stream sends."},
        **_UNKNOWN,
        **_INVALID,
        **_UNAVAILABLE,
    },
    summary="New prices as they are stored, as Server-Sent Events; resumable with Last-Event-ID",
)
async def stream(
    query: Annotated[SnapshotQuery, Query()],
    database: ReadDatabaseDep,
    settings: SettingsDep,
    feed: live.PriceFeedDep,
    last_event_id: Annotated[
        str | None,
        Header(
            description="The last event's `id` a client received: resume after it.",
            # Documented, checked by `_resume_point`: a bad id is a 400, as in every HTTP API.
            json_schema_extra={"pattern": r"^[0-9]{0,19}$"},
        ),
    ] = None,
) -> EventSourceResponse:
    resume_after = _resume_point(last_event_id)
    tickers = query.ticker or list(settings.tickers)
    async with database.reader() as reader:
        for ticker in tickers:
            await _require_known(reader, settings, ticker)
    await feed.wait_ready()

    async def price_events() -> AsyncIterator[ServerSentEvent]:
        async for item in live.events(feed, database, tickers, resume_after):
            if isinstance(item, live.ResumeReset):
                notice = {
                    "reason": "resume point beyond the newest stored row (the database was restored "
                    "or replaced): continuing after the newest row; reload anything kept from before",
                    "last_event_id": item.requested_seq,
                    "newest_seq": item.newest_seq,
                }
                yield ServerSentEvent(
                    exact_json.dumps(notice).decode(), event="reset", id=str(item.newest_seq)
                )
            else:
                yield ServerSentEvent(
                    exact_json.dumps(item.row._asdict()).decode(), event="price", id=str(item.seq)
                )

    return EventSourceResponse(
        price_events(), ping=STREAM_PING_SECONDS, send_timeout=STREAM_SEND_TIMEOUT_SECONDS
    )


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(database: ReadDatabaseDep, settings: SettingsDep) -> Response:
    """Prometheus text format: this API's processes, plus figures read from the database now
    (the newest price of each configured ticker and its coverage over the last 24 hours)."""
    now = time.time()
    async with database.reader() as reader:
        newest = await reader.latest_of(settings.tickers, not_after=_fresh_until(now))
        coverage = {
            ticker: await _recent_coverage(reader, settings, ticker, now) for ticker in settings.tickers
        }
    families = metrics.data_families(
        {ticker: (float(row.price), row.ts) for ticker, row in newest.items()}, coverage
    )
    return Response(metrics.exposition(families), media_type=metrics.CONTENT_TYPE)


def _parquet_stream() -> "ParquetStream":
    # pyarrow costs some 50 MB in every API process: only one that exports Parquet loads it.
    from crypto_client.export.parquet import ParquetStream

    return ParquetStream()


@router.get(
    "/prices/export",
    responses={
        200: {
            "description": "The whole range as a file, streamed oldest first.",
            "content": {"text/csv": {}, "application/x-ndjson": {}, "application/vnd.apache.parquet": {}},
        },
        **_UNKNOWN,
        **_INVALID,
        **_UNAVAILABLE,
    },
    summary="A ticker's prices in a range as CSV, NDJSON or Parquet, streamed",
)
async def export(
    query: Annotated[ExportQuery, Query()], database: ReadDatabaseDep, settings: SettingsDep
) -> StreamingResponse:
    lower, upper = query.from_ts or 0, MAX_TS if query.to_ts is None else query.to_ts
    async with database.reader() as reader:
        await _require_known(reader, settings, query.ticker)

    # Parquet is made from the CSV batches (the database's exact price text).
    parquet = _parquet_stream() if query.format == "parquet" else None
    batch_format: ExportFormat = "csv" if query.format == "parquet" else query.format

    async def batches() -> AsyncIterator[str | bytes]:
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
                        query.ticker, batch_format, lower=start, upper=upper, limit=EXPORT_BATCH_ROWS
                    )
                if parquet is not None:
                    # Whole row groups only: `add` keeps smaller batches for the next one.
                    groups = parquet.add(page.text) if page.text else b""
                    if groups:
                        yield groups
                elif page.text:
                    yield page.text + "\n"
                rows_sent += page.rows
                start = page.next_ts
            if parquet is not None:
                # The footer: without it (a cut body) no reader takes the file for whole.
                yield parquet.finish()
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


@router.get(
    "/coverage",
    response_model=CoverageOut,
    responses={
        200: {**_PAGED, "description": "Slot coverage; gaps oldest first, paged by Link."},
        **_UNKNOWN,
        **_INVALID,
        **_UNAVAILABLE,
    },
    summary="Expected, stored and missing slots of a ticker, with the gaps and why",
)
async def coverage(
    request: Request,
    query: Annotated[CoverageQuery, Query()],
    database: ReadDatabaseDep,
    settings: SettingsDep,
) -> JSONBytes:
    start_slot = decode_cursor(query.cursor) if query.cursor is not None else None
    async with database.reader() as reader:
        await _require_known(reader, settings, query.ticker)
        result = await measure(
            reader,
            query.ticker,
            settings.ingest_interval_seconds,
            from_ts=query.from_ts,
            to_ts=query.to_ts,
            start_slot=start_slot,
            limit=query.limit,
        )
    body = {
        "ticker": result.ticker,
        "interval_seconds": result.interval_seconds,
        "from_ts": result.from_ts,
        "to_ts": result.to_ts,
        "expected_slots": result.expected_slots,
        "stored_slots": result.stored_slots,
        "missing_slots": result.missing_slots,
        "coverage": round(result.ratio, 6),
        "gaps": [
            {"from_ts": g.from_ts, "to_ts": g.to_ts, "slots": g.slots, "reason": g.reason, "detail": g.detail}
            for g in result.gaps
        ],
    }
    headers = (
        next_page_link(request, query.ticker, result.next_slot) if result.next_slot is not None else None
    )
    return _json(body, headers=headers)


@router.get(
    "/tickers",
    response_model=list[TickerOut],
    responses={**_INVALID, **_UNAVAILABLE},
    summary="Configured and stored tickers with their row counts and time spans",
)
async def list_tickers(database: ReadDatabaseDep, settings: SettingsDep) -> JSONBytes:
    now = time.time()
    body = []
    async with database.reader() as reader:
        stats = {row.ticker: row for row in await reader.ticker_stats()}
        for ticker in sorted(set(stats) | set(settings.tickers)):
            row = stats.get(ticker)
            recent = await _recent_coverage(reader, settings, ticker, now)
            body.append(
                {
                    "ticker": ticker,
                    "configured": ticker in settings.tickers,
                    "rows": row.rows if row else 0,
                    "first_ts": row.first_ts if row else None,
                    "last_ts": row.last_ts if row else None,
                    "age_seconds": _age(row.last_ts, now) if row else None,
                    "coverage_24h": None if recent is None else round(recent, 6),
                }
            )
    return _json(body)


@router.get(
    "/health",
    response_model=HealthOut,
    responses={**_INVALID, 503: {"model": HealthOut, "description": "The database did not answer."}},
    summary="200 when the API can read price_ticks within a second, else 503",
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
    return _json({"status": "unavailable", "database": problem}, status_code=503)


@router.get("/livez", response_model=HealthOut, summary="200 while the process runs (no I/O)")
async def livez() -> JSONBytes:
    return _json({"status": "ok", "database": "not checked"})


@router.get(
    "/readyz",
    response_model=ReadinessOut,
    responses={503: {"model": ReadinessOut, "description": "The database or a ticker's freshness fails."}},
    summary="200 when the database answers and every configured ticker has a fresh price",
)
async def readyz(request: Request, database: ReadDatabaseDep, settings: SettingsDep) -> JSONBytes:
    now = time.time()
    stale: dict[str, str] = {}
    # `serve` runs the stream consumer in this process; a crashed one (waiting to restart) is
    # not ready, one that is reconnecting is said but polling covers for it.
    consumer = getattr(request.app.state, "stream_health", None)
    stream = None if consumer is None else consumer.describe()
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS), database.reader(queued=False) as reader:
            for ticker in settings.tickers:
                row = await reader.latest(ticker, not_after=_fresh_until(now))
                if row is None:
                    stale[ticker] = "no price stored yet"
                elif _age(row.ts, now) > settings.stale_after:
                    stale[ticker] = (
                        f"newest price is {_age(row.ts, now)} s old (more than {settings.stale_after} s)"
                    )
    except Exception as exc:  # any failure to read is what this reports
        problem = "no answer in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}"
        return _json(
            {"status": "unavailable", "database": problem, "stale": {}, "stream": stream}, status_code=503
        )
    ready = not stale and (consumer is None or consumer.running)
    return _json(
        {"status": "ok" if ready else "unavailable", "database": "ok", "stale": stale, "stream": stream},
        status_code=200 if ready else 503,
    )
