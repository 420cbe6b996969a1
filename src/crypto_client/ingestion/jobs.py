"""The periodic jobs, in one table.

Celery beat's schedule, the Celery tasks (`worker/tasks.py`) and the embedded scheduler of
`crypto-client serve` are all made from `JOBS`, so a new job is one entry here: its name, its
period, what it runs and what its Celery task returns.

Every job is due at the start of each period on the wall clock (`floor(now / period)`), and a
run not started within its period is dropped (Celery's `expires`), never piled up. How a job
is kept to one run at a time:
- a job with `claims_slot` (the ingest tick) has its slot fixed when it is published and
  claimed in Redis, so a redelivered message reruns that slot and a duplicate skips it;
- every other job takes a non-blocking Redis lock: a run while another worker holds it is
  skipped. In `crypto-client serve` (one process) the repair's own per-process lock
  (`IngestionRuntime.repair_recent`) does that work.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from crypto_client.config import Settings
from crypto_client.ingestion.backfill import BackfillReport
from crypto_client.ingestion.maintenance import MAINTENANCE_INTERVAL_SECONDS, MaintenanceReport
from crypto_client.ingestion.runtime import IngestionRuntime
from crypto_client.ingestion.settlements import SETTLEMENTS_INTERVAL_SECONDS, SettlementReport
from crypto_client.ingestion.tick import TickSummary

Result = TypeVar("Result")

# A lock outlives a short period: a run that is slow to start must not find it lapsed.
MIN_LOCK_SECONDS = 60


@dataclass(frozen=True, slots=True)
class PeriodicJob(Generic[Result]):
    name: str  # the beat entry's name, the Redis lock's and (with `_`) the Celery task's
    period_seconds: Callable[[Settings], int]  # 0: the job is off
    # Given the time it runs for: a `claims_slot` job's slot; the others ignore it.
    run: Callable[[IngestionRuntime, int], Awaitable[Result]]
    summarise: Callable[[Result], dict[str, int]]  # the Celery task's result
    claims_slot: bool = False  # else: a non-blocking lock, one run at a time per deployment

    @property
    def task(self) -> str:
        return f"crypto_client.{self.name.replace('-', '_')}"

    @property
    def lock_key(self) -> str:
        return f"crypto-client:{self.name}"

    def lock_seconds(self, settings: Settings) -> int:
        return max(MIN_LOCK_SECONDS, self.period_seconds(settings))


def _tick_counts(summary: TickSummary) -> dict[str, int]:
    return {status: summary.count(status) for status in ("stored", "duplicate", "failed")}


async def _repair(runtime: IngestionRuntime, _slot: int) -> list[BackfillReport]:
    return await runtime.repair_recent() or []  # None: this process's previous repair still runs


def _repair_counts(reports: list[BackfillReport]) -> dict[str, int]:
    return {
        "filled": sum(report.filled for report in reports),
        "not_repairable": sum(report.not_repairable for report in reports),
        "history_unavailable": sum(report.history_unavailable for report in reports),
        "failed_tickers": sum(1 for report in reports if not report.ok),
    }


async def _maintain(runtime: IngestionRuntime, _slot: int) -> MaintenanceReport:
    return await runtime.maintain_storage()


def _maintenance_counts(report: MaintenanceReport) -> dict[str, int]:
    return {"created": len(report.created), "dropped": len(report.dropped), "deleted": report.deleted}


async def _settle(runtime: IngestionRuntime, _slot: int) -> list[SettlementReport]:
    return await runtime.update_settlements()


def _settlement_counts(reports: list[SettlementReport]) -> dict[str, int]:
    return {
        "stored": sum(report.stored for report in reports),
        "failed_tickers": sum(1 for report in reports if report.error is not None),
    }


JOBS: tuple[PeriodicJob[Any], ...] = (
    PeriodicJob(
        "ingest-tick",
        lambda settings: settings.ingest_interval_seconds,
        IngestionRuntime.run_tick,
        _tick_counts,
        claims_slot=True,
    ),
    # Recent gaps, from the chart and then the trades (`BACKFILL_INTERVAL_SECONDS`, 0: off).
    PeriodicJob(
        "repair-recent", lambda settings: settings.backfill_interval_seconds, _repair, _repair_counts
    ),
    # Partitions ahead of time, and what `RETENTION_DAYS` no longer keeps.
    PeriodicJob("maintain-storage", lambda _: MAINTENANCE_INTERVAL_SECONDS, _maintain, _maintenance_counts),
    # Deribit's daily delivery prices (at start and each UTC midnight).
    PeriodicJob("update-settlements", lambda _: SETTLEMENTS_INTERVAL_SECONDS, _settle, _settlement_counts),
)
