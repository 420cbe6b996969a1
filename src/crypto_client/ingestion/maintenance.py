"""Storage upkeep, run every `MAINTENANCE_INTERVAL_SECONDS`:

- on a partitioned PostgreSQL table, monthly partitions are created `MONTHS_AHEAD` ahead
  (rows that arrived for a month without one wait in the default partition and move in);
- with `RETENTION_DAYS`, rows older than the bound are removed with what describes them (the
  candle roll-up and the ledger), so that `/coverage` does not report them as gaps. Whole
  expired partitions are dropped; what is left goes in small batches, each its own short
  transaction, one ticker at a time along the primary key. Creating and dropping a partition
  wait at most 200 ms for their locks (queries would queue behind a waiting lock) and are
  tried again, here or in a later run. Ingestion and the API never wait behind the upkeep.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.candles import HOUR
from crypto_client.db.engine import is_lock_timeout
from crypto_client.db.partitions import Partition, PartitionAdmin
from crypto_client.db.reader import PriceReader
from crypto_client.db.writer import write_transaction

log = structlog.get_logger(__name__)
T = TypeVar("T")

MAINTENANCE_INTERVAL_SECONDS = 3600
MONTHS_AHEAD = 2
BATCH_ROWS = 5_000
LOCK_ATTEMPTS = 5
LOCK_RETRY_SECONDS = 1.0


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
        # Two months ahead: a month not made now is made by a later run.
        done, moved = await when_the_table_allows(engine, "create", wanted, PartitionAdmin.create)
        if done:
            report.moved_from_default += moved or 0
            report.created.append(wanted.name)


async def _drop_expired(engine: AsyncEngine, cutoff: int, report: MaintenanceReport) -> None:
    async with engine.connect() as connection:
        partitions = await PartitionAdmin(connection).range_partitions()
    for partition in (each for each in partitions if each.upper <= cutoff):
        # A partition not dropped now keeps its rows only until the batched deletes below.
        done, _ = await when_the_table_allows(engine, "drop", partition, PartitionAdmin.drop)
        if done:
            report.dropped.append(partition.name)


async def when_the_table_allows(
    engine: AsyncEngine,
    what: str,
    partition: Partition,
    change: Callable[[PartitionAdmin, Partition], Awaitable[T]],
) -> tuple[bool, T | None]:
    """Run a partition change in its own transaction, retrying while it cannot get its locks
    soon enough (queries hold the table); whether it ran, and its result."""
    for attempt in range(LOCK_ATTEMPTS):
        try:
            async with engine.begin() as connection:
                return True, await change(PartitionAdmin(connection), partition)
        except DBAPIError as exc:
            if not is_lock_timeout(exc):
                raise
            if attempt == LOCK_ATTEMPTS - 1:
                log.warning(
                    "partition change postponed: the table stayed busy", change=what, partition=partition.name
                )
                break
            await asyncio.sleep(LOCK_RETRY_SECONDS)
    return False, None


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
        await writer.expire_before(first_slot)
