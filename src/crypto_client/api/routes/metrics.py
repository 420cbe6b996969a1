"""Prometheus metrics of the API's processes and of the data."""

import time

from fastapi import APIRouter, Response

from crypto_client import metrics
from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.freshness import fresh_until, recent_coverage

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(database: ReadDatabaseDep, settings: SettingsDep) -> Response:
    """Prometheus text format: this API's processes, plus figures read from the database now
    (the newest price of each configured ticker and its coverage over the last 24 hours)."""
    now = time.time()
    async with database.reader() as reader:
        newest = await reader.latest_of(settings.tickers, not_after=fresh_until(now))
        coverage = {
            ticker: await recent_coverage(reader, settings, ticker, now) for ticker in settings.tickers
        }
    families = metrics.data_families(
        {ticker: (float(row.price), row.ts) for ticker, row in newest.items()}, coverage
    )
    return Response(metrics.exposition(families), media_type=metrics.CONTENT_TYPE)
