"""The ingestion scenarios: tick duration against the simulator, one worker's capacity, bulk
inserts."""

import asyncio
import statistics
import time
from decimal import Decimal

import httpx

from bench.common import BASE_TS, WORK, Plan, Results
from crypto_client.config import Settings
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice
from crypto_client.ingestion.runtime import IngestionRuntime, open_runtime
from crypto_client.sim.prices import INDEXES, SYNTHETIC_INDEXES
from tests.support.services import SimServer


def ingest_settings(tickers: list[str], sim: SimServer, url: str) -> Settings:
    return Settings.model_validate(
        {
            "tickers": tickers,
            "deribit_rpc_url": sim.rpc_url,
            "database_url": url,
            "ingest_interval_seconds": 1,
        }
    )


async def tick_durations(runtime: IngestionRuntime, ticks: int = 5) -> list[float]:
    durations = []
    for _ in range(ticks):
        summary = await runtime.run_tick(slot_ts=None)
        assert summary.ok, summary
        durations.append(summary.duration_seconds)
        await asyncio.sleep(1.05)  # a new second: new rows, not duplicates
    return durations


async def ingestion_scenarios(plan: Plan, url: str, results: Results) -> None:
    sim = SimServer(WORK)
    tickers = list(INDEXES)[: plan.ingest_tickers]
    try:
        sim.faults(latency_ms=100)
        settings = ingest_settings(tickers, sim, url)
        async with open_runtime(settings) as runtime:
            durations = await tick_durations(runtime)
            results.extra[f"Ingestion tick, {len(tickers)} tickers at 100 ms latency"] = (
                f"median {statistics.median(durations):.3f} s, worst {max(durations):.3f} s"
                f" (DERIBIT_MAX_CONCURRENCY={settings.deribit_max_concurrency})"
            )
            median = statistics.median(durations)
            results.targets.append(("ingestion tick of 50 tickers < 0.5 s", median < 0.5, f"{median:.3f} s"))

            started = time.monotonic()
            with httpx.Client() as naive:
                for ticker in tickers:
                    response = naive.get(
                        f"{sim.rpc_url}/public/get_index_price", params={"index_name": ticker}
                    )
                    response.raise_for_status()
            results.extra[f"Naive sequential fetch of the same {len(tickers)} tickers"] = (
                f"{time.monotonic() - started:.3f} s"
            )

            await worker_capacity(plan, sim, url, results)

            count = 100_000 if not plan.smoke else 5_000
            batch = [NewPrice("bulk_usd", Decimal("43521.37"), BASE_TS + i) for i in range(count)]
            started = time.monotonic()
            async with runtime.engine.begin() as connection:
                inserted = await PriceWriter(connection).insert_many(batch)
            assert len(inserted) == count
            elapsed = time.monotonic() - started
            results.extra["Bulk insert (insert_many, one transaction)"] = (
                f"{count / elapsed:,.0f} rows/s ({count:,} rows)"
            )
    finally:
        sim.stop()


async def worker_capacity(plan: Plan, sim: SimServer, url: str, results: Results) -> None:
    """How many tickers one ingestion process sustains: ticks of many tickers at a realistic
    Deribit round trip, and what fits in 80% of a 1 s and a 60 s slot at that pace."""
    tickers = list(SYNTHETIC_INDEXES)[: 40 if plan.smoke else 200]
    sim.faults(latency_ms=50)
    async with open_runtime(ingest_settings(tickers, sim, url)) as runtime:
        durations = await tick_durations(runtime)
    median = statistics.median(durations)
    per_second = len(tickers) / median
    results.extra[f"Ingestion tick, {len(tickers)} tickers at 50 ms latency (one process)"] = (
        f"median {median:.3f} s: about {per_second:,.0f} tickers/s, so one worker process sustains about"
        f" {int(0.8 * per_second):,} tickers at 1 s slots and {int(0.8 * 60 * per_second):,} at 60 s"
        " (Deribit's rate limits come first)"
    )
