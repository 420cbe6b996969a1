"""RETENTION_DAYS on both backends: exactly the rows older than the bound go, with their
roll-up hours and ledger entries, and coverage does not report them as gaps."""

import subprocess
import sys
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.coverage import measure
from crypto_client.db.reader import PriceReader
from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice, SlotFailure
from crypto_client.ingestion.maintenance import maintain_storage, retention_cutoff

DAY = 86_400
START = 1_767_225_600  # 2026-01-01 00:00 UTC
NOW = START + 3 * DAY + 1_234  # three days of rows, then a little
SLOTS = range(START, NOW - 60, 60)


async def seed(engine: AsyncEngine) -> None:
    async with write_transaction(engine) as writer:
        for ticker in ("btc_usd", "eth_usd"):
            await writer.insert_many(
                [NewPrice(ticker, Decimal(f"{100 + n % 50}.5"), slot, slot) for n, slot in enumerate(SLOTS)]
            )
        # A ticker nobody tracks (stored by hand): its old rows go too.
        await writer.insert_many([NewPrice("sol_usdc", Decimal("9.75"), START + n * 3600) for n in range(72)])
        await writer.track(["btc_usd", "eth_usd"], START)
        await writer.record_failures(
            [
                SlotFailure("btc_usd", START + 600, "deribit_failed", "old"),
                SlotFailure("btc_usd", NOW - 600, "deribit_failed", "recent"),
            ]
        )


async def counts(engine: AsyncEngine, cutoff: int) -> dict[str, int]:
    async with engine.connect() as connection:
        found = {}
        for name, query in {
            "old_rows": "SELECT count(*) FROM price_ticks WHERE ts < :cutoff",
            "kept_rows": "SELECT count(*) FROM price_ticks WHERE ts >= :cutoff",
            "old_hours": "SELECT count(*) FROM price_candles_1h WHERE bucket < :cutoff",
            "old_failures": "SELECT count(*) FROM slot_failures WHERE slot_ts < :cutoff",
            "failures": "SELECT count(*) FROM slot_failures",
            "tracked_before": "SELECT count(*) FROM tracked_tickers WHERE since_slot_ts < :cutoff",
        }.items():
            found[name] = int((await connection.execute(text(query), {"cutoff": cutoff})).scalar_one())
        return found


async def test_retention_removes_exactly_the_expired_rows_and_what_describes_them(
    engine: AsyncEngine,
) -> None:
    await seed(engine)
    cutoff = retention_cutoff(2, NOW)
    assert cutoff % 3600 == 0
    assert START < cutoff < NOW
    before = await counts(engine, cutoff)
    expected_deleted = before["old_rows"]
    assert expected_deleted > 0

    # Tiny batches: many short transactions, none holding the table for long.
    report = await maintain_storage(engine, retention_days=2, interval_seconds=60, now=NOW, batch_rows=97)

    assert report.cutoff == cutoff
    assert report.deleted == expected_deleted
    after = await counts(engine, cutoff)
    assert after == {
        "old_rows": 0,
        "kept_rows": before["kept_rows"],
        "old_hours": 0,
        "old_failures": 0,
        "failures": 1,
        "tracked_before": 0,
    }
    async with engine.connect() as connection:
        reader = PriceReader(connection)
        # The roll-up still equals the rows it describes.
        rolled = await reader.candles("btc_usd", DAY, 0, 0, NOW)
        assert rolled == await reader.candles_from_rows("btc_usd", DAY, 0, 0, NOW)
        assert rolled[0].ts == cutoff - cutoff % DAY
        # Removed slots are not gaps: coverage starts at the bound and is complete.
        coverage = await measure(reader, "btc_usd", 60, now=NOW - 60, limit=10)
        assert coverage.from_ts == cutoff
        assert coverage.missing_slots == 0
        assert await reader.stored_tickers() == ["btc_usd", "eth_usd", "sol_usdc"]

    again = await maintain_storage(engine, retention_days=2, interval_seconds=60, now=NOW, batch_rows=97)
    assert again.deleted == 0


def test_storage_upkeep_is_scheduled_hourly_with_an_expiry() -> None:
    probe = (
        "from crypto_client.worker.celery_app import celery_app;"
        "entry = celery_app.conf.beat_schedule['maintain-storage'];"
        "print(entry['task'], entry['options']['expires'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "crypto_client.maintain_storage 3600"
