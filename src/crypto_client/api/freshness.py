"""How old a price is, and which count as current: shared by the price, ticker, metrics and
readiness routes."""

from typing import Any

from crypto_client.config import Settings
from crypto_client.coverage import measure
from crypto_client.db.reader import PriceReader
from crypto_client.domain import PriceRow

COVERAGE_WINDOW_SECONDS = 86_400

# How far a row's `ts` may lie ahead of this process's clock and still count as the newest
# price (clocks of the writing and the reading hosts differ a little). A row further ahead is
# not "now": it must not pin the newest price at age 0 while nothing is stored any more.
FUTURE_TS_TOLERANCE_SECONDS = 5


def age(ts: int, now: float) -> int:
    return max(0, int(now) - ts)


def with_age(row: PriceRow, now: float) -> dict[str, Any]:
    return {**row._asdict(), "age_seconds": age(row.ts, now)}


def fresh_until(now: float) -> int:
    """The newest `ts` that counts as a current price at `now`."""
    return int(now) + FUTURE_TS_TOLERANCE_SECONDS


async def recent_coverage(reader: PriceReader, settings: Settings, ticker: str, now: float) -> float | None:
    """Stored over expected slots in the last 24 hours; None before the ticker is tracked."""
    found = await measure(
        reader, ticker, settings.ingest_interval_seconds, from_ts=int(now) - COVERAGE_WINDOW_SECONDS, now=now
    )
    return None if found.from_ts is None else found.ratio
