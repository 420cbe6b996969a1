"""Nothing in a tick crashes the whole tick: an unusable envelope time or observation only
affects its own ticker (under the clock rule), with its reason in the ledger."""

import math
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.clients.source import FetchResult, HistoryPoint, Observation
from crypto_client.ingestion.runtime import IngestionRuntime
from tests.support.services import SimServer
from tests.support.settings import INGEST_TICKERS, ingestion_settings, make_settings
from tests.support.slots import roomy_slot


async def test_absurd_envelope_times_fall_back_to_the_local_clock_per_ticker(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str
) -> None:
    sim.faults("eth_usd", us_out_literal="9" * 300)  # an integer no float can hold
    sim.faults("sol_usdc", us_out_literal='"' + "9" * 5000 + '"')  # beyond Python's int parsing
    started = time.time()
    with capture_logs() as logs:
        summary = await IngestionRuntime(ingestion_settings(sim, db_url), engine, deribit, deribit).run_tick(
            await roomy_slot()
        )
    assert {o.ticker: o.status for o in summary.outcomes} == dict.fromkeys(INGEST_TICKERS, "stored")
    assert all(started - 1 <= (o.ts or 0) <= time.time() + 1 for o in summary.outcomes)
    warned = {line["ticker"] for line in logs if line["event"].startswith("source time not used")}
    assert warned == {"eth_usd", "sol_usdc"}


async def test_an_envelope_nested_too_deep_fails_only_its_ticker(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str
) -> None:
    sim.faults("eth_usd", us_out_literal="[" * 100_000 + "]" * 100_000)
    summary = await IngestionRuntime(ingestion_settings(sim, db_url), engine, deribit, deribit).run_tick(
        await roomy_slot()
    )
    outcome = {o.ticker: o for o in summary.outcomes}
    assert (outcome["eth_usd"].status, outcome["eth_usd"].reason) == ("failed", "deribit_failed")
    assert "malformed" in (outcome["eth_usd"].error or "")
    assert [outcome[t].status for t in ("btc_usd", "sol_usdc")] == ["stored", "stored"]


class OneUnplaceable:
    """A source whose observation of `eth_usd` has a receive time that is no time at all:
    nothing the real client produces, so it is made up here to reach the last guard."""

    async def fetch_prices(
        self, tickers: Sequence[str], *, deadline: float | None = None
    ) -> list[FetchResult]:
        now = time.time()
        return [
            FetchResult(t, Observation(t, Decimal("2.5"), None, now, math.nan if t == "eth_usd" else now))
            for t in tickers
        ]

    @property
    def history_ranges(self) -> Mapping[str, int | None]:
        return {"all": None}

    async def fetch_history(self, ticker: str, range_name: str) -> list[HistoryPoint]:
        return []

    async def aclose(self) -> None:
        return None


async def test_an_observation_that_cannot_be_placed_fails_alone_with_its_reason(
    engine: AsyncEngine, db_url: str
) -> None:
    settings = make_settings(db_url, tickers=",".join(INGEST_TICKERS))
    slot = await roomy_slot()
    summary = await IngestionRuntime(settings, engine, OneUnplaceable(), OneUnplaceable()).run_tick(slot)
    outcome = {o.ticker: o for o in summary.outcomes}
    assert (outcome["eth_usd"].status, outcome["eth_usd"].reason) == ("failed", "invalid_value")
    assert [outcome[t].status for t in ("btc_usd", "sol_usdc")] == ["stored", "stored"]
    async with engine.connect() as connection:
        ledger = (await connection.execute(text("SELECT ticker, slot_ts, reason FROM slot_failures"))).all()
        stored = (await connection.execute(text("SELECT ticker FROM price_ticks ORDER BY ticker"))).all()
    assert [tuple(row) for row in ledger] == [("eth_usd", slot, "invalid_value")]
    assert [row[0] for row in stored] == ["btc_usd", "sol_usdc"]
