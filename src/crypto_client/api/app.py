"""The FastAPI application. Its engine lives in the lifespan; whoever runs the API may add
lifespan contexts of their own (`crypto-client serve` adds migration and ingestion)."""

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from crypto_client import __version__
from crypto_client.api.cache import LatestPriceCache
from crypto_client.api.deps import ReadDatabase
from crypto_client.api.middleware import RequestLogMiddleware
from crypto_client.api.routes import router
from crypto_client.config import Settings, get_settings
from crypto_client.db.engine import DatabaseUnavailableError, create_engine, is_database_unavailable

log = structlog.get_logger(__name__)

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[object]]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        for extra in app.state.extra_lifespans:
            await stack.enter_async_context(extra(app))
        engine = create_engine(
            settings.database_url_value, pool_size=settings.database_pool_size, read_only=True
        )
        stack.push_async_callback(engine.dispose)
        # As many request slots as the pool has connections (pool_size plus as many overflow).
        app.state.read_database = ReadDatabase(engine, connections=2 * settings.database_pool_size)
        app.state.latest_cache = LatestPriceCache(settings.api_latest_cache_seconds)
        log.info("api started", version=__version__)
        yield


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
    if isinstance(exc, PoolTimeoutError):
        log.warning("no database connection free in time", path=request.url.path)
        return JSONResponse({"detail": "the service is busy, try again shortly"}, status_code=503)
    if is_database_unavailable(exc):
        log.warning("database unavailable", path=request.url.path, error=repr(exc))
        return JSONResponse({"detail": "the database is unavailable, try again shortly"}, status_code=503)
    log.exception("database error", path=request.url.path)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def create_app(settings: Settings | None = None, *, lifespans: Sequence[Lifespan] = ()) -> FastAPI:
    """The read-only API. `lifespans` are entered, in order, before the API's own engine and
    exited after it."""
    app = FastAPI(
        title="crypto-client",
        version=__version__,
        description="Exact history of Deribit index prices. Read-only.",
        lifespan=_lifespan,
    )
    app.state.settings = settings or get_settings()
    app.state.extra_lifespans = tuple(lifespans)
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for error in (DBAPIError, PoolTimeoutError, DatabaseUnavailableError):
        app.add_exception_handler(error, _database_error)
    if app.state.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(app.state.settings.cors_origins), allow_methods=["GET"]
        )
    app.add_middleware(RequestLogMiddleware)
    return app
