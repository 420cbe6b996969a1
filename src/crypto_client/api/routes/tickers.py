"""The configured and stored tickers, with their row counts, spans and recent coverage."""

import time

from fastapi import APIRouter

from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.freshness import age, recent_coverage
from crypto_client.api.responses import INVALID, UNAVAILABLE, JSONBytes, json_response
from crypto_client.api.schemas import TickerOut

router = APIRouter()


@router.get(
    "/tickers",
    response_model=list[TickerOut],
    responses={**INVALID, **UNAVAILABLE},
    summary="Configured and stored tickers with their row counts and time spans",
)
async def list_tickers(database: ReadDatabaseDep, settings: SettingsDep) -> JSONBytes:
    now = time.time()
    body = []
    async with database.reader() as reader:
        stats = {row.ticker: row for row in await reader.ticker_stats()}
        for ticker in sorted(set(stats) | set(settings.tickers)):
            row = stats.get(ticker)
            recent = await recent_coverage(reader, settings, ticker, now)
            body.append(
                {
                    "ticker": ticker,
                    "configured": ticker in settings.tickers,
                    "rows": row.rows if row else 0,
                    "first_ts": row.first_ts if row else None,
                    "last_ts": row.last_ts if row else None,
                    "age_seconds": age(row.last_ts, now) if row else None,
                    "coverage_24h": None if recent is None else round(recent, 6),
                }
            )
    return json_response(body)
