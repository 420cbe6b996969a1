"""Whether the API runs (`/livez`), reads its database (`/health`) and serves fresh prices
(`/readyz`)."""

import asyncio
import time

from fastapi import APIRouter, Request

from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.freshness import age, fresh_until
from crypto_client.api.responses import INVALID, JSONBytes, json_response
from crypto_client.api.schemas import HealthOut, ReadinessOut
from crypto_client.db.engine import is_database_unavailable

HEALTH_TIMEOUT_SECONDS = 1.0

router = APIRouter()


@router.get(
    "/health",
    response_model=HealthOut,
    responses={**INVALID, 503: {"model": HealthOut, "description": "The database did not answer."}},
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
                        origins = await reader.data_origins()
                    return json_response(
                        {
                            "status": "ok",
                            "database": "ok",
                            "data_origin": origins.first,
                            "data_origin_overrides": origins.by_override,
                        }
                    )
                except Exception as exc:  # any failure to reach the database is what this reports
                    problem = (
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreachable'}"
                    )
                    if attempt == 2 or not is_database_unavailable(exc):
                        break
    except TimeoutError:
        problem = f"no answer within {HEALTH_TIMEOUT_SECONDS:g}s"
    return json_response({"status": "unavailable", "database": problem}, status_code=503)


@router.get("/livez", response_model=HealthOut, summary="200 while the process runs (no I/O)")
async def livez() -> JSONBytes:
    return json_response({"status": "ok", "database": "not checked"})


@router.get(
    "/readyz",
    response_model=ReadinessOut,
    responses={503: {"model": ReadinessOut, "description": "The database or a ticker's freshness fails."}},
    summary="200 when the database answers and every configured ticker has a fresh price",
)
async def readyz(request: Request, database: ReadDatabaseDep, settings: SettingsDep) -> JSONBytes:
    now = time.time()
    stale: dict[str, str] = {}
    replication, lagging = "not a replica", False
    # `serve` runs the stream consumer in this process; a crashed one (waiting to restart) is
    # not ready, one that is reconnecting is said but polling covers for it.
    consumer = getattr(request.app.state, "stream_health", None)
    stream = None if consumer is None else consumer.describe()
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS), database.reader(queued=False) as reader:
            if (replica := await reader.replication()) is not None:
                bound = settings.database_read_max_lag_seconds
                lagging = not replica.streaming or replica.lag_seconds > bound
                replication = (
                    ("ok" if not lagging else f"lagging (more than {bound:g} s)")
                    + f": {replica.lag_seconds:.1f} s behind the primary"
                    + ("" if replica.streaming else ", not streaming from it")
                )
            for ticker in settings.tickers:
                row = await reader.latest(ticker, not_after=fresh_until(now))
                if row is None:
                    stale[ticker] = "no price stored yet"
                elif age(row.ts, now) > settings.stale_after:
                    stale[ticker] = (
                        f"newest price is {age(row.ts, now)} s old (more than {settings.stale_after} s)"
                    )
    except Exception as exc:  # any failure to read is what this reports
        problem = "no answer in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}"
        return json_response(
            {"status": "unavailable", "database": problem, "stale": {}, "stream": stream}, status_code=503
        )
    ready = not stale and not lagging and (consumer is None or consumer.running)
    body = {
        "status": "ok" if ready else "unavailable",
        "database": "ok",
        "stale": stale,
        "stream": stream,
        "replication": replication,
    }
    return json_response(body, status_code=200 if ready else 503)
