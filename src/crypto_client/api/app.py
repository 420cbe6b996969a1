"""The FastAPI application. Its engine lives in the lifespan; whoever runs the API may add
lifespan contexts of their own (`crypto-client serve` adds migration and ingestion)."""

import asyncio
import gc
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import FrameType

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from crypto_client import __version__, metrics
from crypto_client.api.auth import Access, AccessGuard, with_key_security
from crypto_client.api.cache import LatestPriceCache
from crypto_client.api.errors import NoPriceError, UnknownTickerError, not_found_response
from crypto_client.api.limits import ConcurrencyCap
from crypto_client.api.live import PriceFeed
from crypto_client.api.middleware import CancelOnDisconnect, HeadAsGet, RequestLogMiddleware
from crypto_client.api.routes import router
from crypto_client.api.routes.pages import STATIC
from crypto_client.config import Settings, get_settings, load_settings
from crypto_client.db.engine import (
    DatabaseUnavailableError,
    QueryTimeoutError,
    create_engine,
    is_database_unavailable,
    is_query_timeout,
)
from crypto_client.db.reader import ReadDatabase
from crypto_client.logging import setup_logging

log = structlog.get_logger(__name__)

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[object]]
# A 503 of the database's is over in moments (a restart, a failover, a full pool): clients that
# honour Retry-After come back then rather than hammering or giving up.
RETRY_AFTER_SECONDS = 1
_RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_SECONDS)}


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        for extra in app.state.extra_lifespans:
            await stack.enter_async_context(extra(app))
        engine = create_engine(
            settings.database_read_url_value,
            pool_size=settings.database_pool_size,
            read_only=True,
            statement_timeout_seconds=settings.api_statement_timeout_seconds,
        )
        stack.push_async_callback(engine.dispose)
        # As many request slots as the pool has connections.
        app.state.read_database = ReadDatabase(
            engine, settings.database_pool_size, settings.api_statement_timeout_seconds
        )
        app.state.latest_cache = LatestPriceCache(settings.api_latest_cache_seconds)
        app.state.access = await stack.enter_async_context(
            Access(settings, engine, settings.quota_storage_url(embedded=app.state.embedded)).running()
        )
        metrics.set_tickers(settings.tickers)
        app.state.price_feed = await stack.enter_async_context(
            PriceFeed(app.state.read_database, settings.listen_url).running()
        )
        _before_stop_signals(app.state.price_feed.close)
        _tune_gc()
        log.info("api started", version=__version__)
        yield
    log.info("api stopped")


def _before_stop_signals(callback: Callable[[], None]) -> None:
    """Run `callback` on the loop when the process is told to stop.

    The server (granian) stops gracefully: it waits for open responses before the lifespan
    ends, and a live stream never ends by itself. Its event loop learns of signals through the
    wakeup fd, which a Python-level handler does not disturb; the one it replaces is a no-op
    that is still called. Outside the main thread (an in-process test server) nothing changes.
    """
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)

        def handler(signo: int, frame: FrameType | None, previous: object = previous) -> None:
            loop.call_soon_threadsafe(callback)
            if callable(previous):
                previous(signo, frame)

        try:
            signal.signal(signum, handler)
        except ValueError:
            return


def _tune_gc() -> None:
    """A long-running server keeps its start-up objects forever: move them out of the
    collector's sight, and collect young objects less often (each full collection of a big
    heap is a pause every request in flight waits for)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, 20, 100)


_GC_YOUNG_THRESHOLD = 20_000


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        loc = [part if isinstance(part, int) else str(part) for part in error.get("loc", ())]
        problems.append(
            {"loc": loc, "msg": str(error.get("msg", "invalid")), "type": str(error.get("type", ""))}
        )
    summary = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'][1:]) or 'query'}: {problem['msg']}"
        for problem in problems
    )
    return JSONResponse({"detail": summary, "errors": problems}, status_code=422)


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if is_query_timeout(exc):
        settings: Settings = request.app.state.settings
        log.warning("query timed out", path=request.url.path, error=str(exc).splitlines()[0])
        detail = (
            f"the query took longer than API_STATEMENT_TIMEOUT_SECONDS "
            f"({settings.api_statement_timeout_seconds:g} s): narrow it (a smaller limit or range)"
            " or try again shortly"
        )
        return JSONResponse({"detail": detail}, status_code=503, headers=_RETRY_AFTER)
    if isinstance(exc, PoolTimeoutError):
        log.warning("no database connection free in time", path=request.url.path)
        return JSONResponse(
            {"detail": "the service is busy, try again shortly"}, status_code=503, headers=_RETRY_AFTER
        )
    if is_database_unavailable(exc):
        log.warning("database unavailable", path=request.url.path, error=repr(exc))
        return JSONResponse(
            {"detail": "the database is unavailable, try again shortly"},
            status_code=503,
            headers=_RETRY_AFTER,
        )
    log.exception("database error", path=request.url.path)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def create_app_from_environment() -> FastAPI:
    """The API as `crypto-client api` builds it (in each worker process, with `--workers N`)."""
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def create_app(
    settings: Settings | None = None, *, lifespans: Sequence[Lifespan] = (), embedded: bool = False
) -> FastAPI:
    """The read-only API. `lifespans` are entered, in order, before the API's own engine and
    exited after it. `embedded`: the only API process (quotas are counted in its memory)."""
    app = FastAPI(
        title="crypto-client",
        version=__version__,
        description="Exact history of Deribit index prices. Read-only.",
        lifespan=_lifespan,
        # No redirect from /path/ to /path: it would echo the request's Host header.
        redirect_slashes=False,
        # /docs is served below from vendored assets: the default loads them from a CDN.
        docs_url=None,
    )
    app.state.settings = settings or get_settings()
    app.state.extra_lifespans = tuple(lifespans)
    settings = app.state.settings
    app.state.stream_cap = ConcurrencyCap("live streams", settings.api_max_streams, "API_MAX_STREAMS")
    app.state.export_cap = ConcurrencyCap("exports", settings.api_max_exports, "API_MAX_EXPORTS")
    app.state.embedded = embedded
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if settings.api_keys_required:  # the document says what AccessGuard asks
        document = app.openapi
        app.openapi = lambda: with_key_security(document())  # type: ignore[method-assign]

    # Innermost of the middleware: CORS answers a preflight without a key, and the request
    # log records the refusals too.
    app.add_middleware(AccessGuard)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for missing in (UnknownTickerError, NoPriceError):
        app.add_exception_handler(missing, not_found_response)
    for error in (DBAPIError, PoolTimeoutError, DatabaseUnavailableError, QueryTimeoutError):
        app.add_exception_handler(error, _database_error)
    if app.state.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(app.state.settings.cors_origins), allow_methods=["GET"]
        )
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(HeadAsGet)
    app.add_middleware(RequestLogMiddleware)
    return app
