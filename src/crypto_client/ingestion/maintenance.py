"""Storage upkeep, run every `MAINTENANCE_INTERVAL_SECONDS`:

- on a partitioned PostgreSQL table, monthly partitions are created `MONTHS_AHEAD` ahead
  (rows that arrived for a month without one wait in the default partition and move in);
- with `RETENTION_DAYS`, rows older than the bound are removed with what describes them (the
  candle roll-up and the ledger), so that `/coverage` does not report them as gaps. Whole
  expired partitions are dropped (waiting at most 200 ms for the table's lock, so readers
  never queue behind it for longer); what is left goes in small batches, each its own short
  transaction, one ticker at a time along the primary key. Ingestion and the API never wait
  behind a long delete.
"""

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.repository import HOUR, Partition, PartitionAdmin, PriceReader, write_transaction

log = structlog.get_logger(__name__)

MAINTENANCE_INTERVAL_SECONDS = 3600
MONTHS_AHEAD = 2
BATCH_ROWS = 5_000
DROP_ATTEMPTS = 5
DROP_RETRY_SECONDS = 1.0


@dataclass(slots=True)
class MaintenanceReport:
    created: list[str] = field(default_factory=list)
    moved_from_default: int = 0
    cutoff: int | None = None  # with retention: rows with ts before this are gone
    dropped: list[str] = field(default_factory=list)
    deleted: int = 0


def retention_cutoff(days: int, now: float) -> int:
    """The bound: `days` before `now`, down to the hour (the roll-up's unit)."""
    bound = int(now) - days * 86_400
    return bound - bound % HOUR


def month_partition(year: int, month: int) -> Partition:
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return Partition(f"price_ticks_{year:04d}_{month:02d}", int(start.timestamp()), int(end.timestamp()))


def months_from(now: float, count: int) -> list[Partition]:
    moment = datetime.fromtimestamp(now, UTC)
    index = moment.year * 12 + moment.month - 1
    return [month_partition(each // 12, each % 12 + 1) for each in range(index, index + count)]


async def maintain_storage(
    engine: AsyncEngine,
    *,
    retention_days: int | None,
    interval_seconds: int,
    now: float | None = None,
    batch_rows: int = BATCH_ROWS,
) -> MaintenanceReport:
    moment = time.time() if now is None else now
    report = MaintenanceReport()
    async with engine.connect() as connection:
        partitioned = await PartitionAdmin(connection).partitioned()
    if partitioned:
        await _create_ahead(engine, moment, report)
    if retention_days is not None:
        report.cutoff = retention_cutoff(retention_days, moment)
        if partitioned:
            await _drop_expired(engine, report.cutoff, report)
        await _delete_expired(engine, report.cutoff, interval_seconds, batch_rows, report)
    log.info(
        "storage maintained",
        created=report.created,
        moved_from_default=report.moved_from_default,
        retention_days=retention_days,
        cutoff=report.cutoff,
        dropped=report.dropped,
        deleted=report.deleted,
    )
    return report


async def _create_ahead(engine: AsyncEngine, now: float, report: MaintenanceReport) -> None:
    async with engine.connect() as connection:
        existing = await PartitionAdmin(connection).range_partitions()
    for wanted in months_from(now, MONTHS_AHEAD + 1):
        if any(each.lower < wanted.upper and wanted.lower < each.upper for each in existing):
            continue  # covered (the history partition of revision 0006 covers whole months)
        async with engine.begin() as connection:
            report.moved_from_default += await PartitionAdmin(connection).create(wanted)
        report.created.append(wanted.name)


async def _drop_expired(engine: AsyncEngine, cutoff: int, report: MaintenanceReport) -> None:
    async with engine.connect() as connection:
        expired = [
            each for each in await PartitionAdmin(connection).range_partitions() if each.upper <= cutoff
        ]
    for partition in expired:
        for attempt in range(DROP_ATTEMPTS):
            try:
                async with engine.begin() as connection:
                    await PartitionAdmin(connection).drop(partition)
            except DBAPIError as exc:
                if attempt == DROP_ATTEMPTS - 1:
                    # Its rows are deleted in batches below instead; the next run drops it.
                    log.warning(
                        "partition not dropped: the table stayed busy",
                        partition=partition.name,
                        error=str(exc),
                    )
                    break
                await asyncio.sleep(DROP_RETRY_SECONDS)
                continue
            report.dropped.append(partition.name)
            break


async def _delete_expired(
    engine: AsyncEngine, cutoff: int, interval_seconds: int, batch_rows: int, report: MaintenanceReport
) -> None:
    async with engine.connect() as connection:
        tickers = await PriceReader(connection).stored_tickers()
    for ticker in tickers:
        while True:
            async with write_transaction(engine) as writer:
                deleted = await writer.delete_older(ticker, cutoff, limit=batch_rows)
            report.deleted += deleted
            if deleted < batch_rows:
                break
    first_slot = -(-cutoff // interval_seconds) * interval_seconds
    async with write_transaction(engine) as writer:
        await writer.expire_before(cutoff, first_slot)
