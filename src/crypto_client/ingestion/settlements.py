"""The daily settlements job: Deribit's delivery prices of every configured ticker, all of
them on the first run, the new ones after. Each page is stored as it arrives, newest first,
until the table holds as many as Deribit reports (`records_total`): a run stopped half-way
is completed by the next one."""

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.clients.trade_source import TradeHistorySource
from crypto_client.db.settlements import Settlement, Settlements
from crypto_client.domain import canonical_price

log = structlog.get_logger(__name__)

SETTLEMENTS_PER_PAGE = 1_000
SETTLEMENTS_INTERVAL_SECONDS = 86_400


@dataclass(slots=True)
class SettlementReport:
    ticker: str
    stored: int = 0
    total: int = 0  # Deribit's records_total
    error: str | None = None


async def update_settlements(
    engine: AsyncEngine, client: TradeHistorySource, tickers: Sequence[str]
) -> list[SettlementReport]:
    reports = []
    for ticker in tickers:
        report = SettlementReport(ticker)
        try:
            await _update(engine, client, report)
        except Exception as exc:
            # An index without delivery prices (or a price not stored exactly) costs only itself.
            report.error = str(exc) or repr(exc)
            log.error("settlement prices failed", ticker=ticker, error=report.error)
        log.info("settlement prices updated", ticker=ticker, stored=report.stored, records_total=report.total)
        reports.append(report)
    return reports


async def _update(engine: AsyncEngine, client: TradeHistorySource, report: SettlementReport) -> None:
    offset = 0
    while True:
        page = await client.delivery_prices(report.ticker, offset, SETTLEMENTS_PER_PAGE)
        report.total = page.records_total
        prices = [Settlement(p.date, canonical_price(p.delivery_price)) for p in page.data]
        async with engine.begin() as connection:
            store = Settlements(connection)
            report.stored += await store.store(report.ticker, prices)
            held = await store.count(report.ticker)
        if not page.data or held >= page.records_total:
            return
        offset += len(page.data)
