"""The Celery task: claims its slot in Redis and runs the shared ingestion function.

Celery tasks are synchronous and the ingestion is async, so every worker process keeps one
event loop of its own, with its own engine and HTTP client bound to that loop. Sharing one
engine between loops fails with "Future attached to a different loop".
"""

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from contextvars import copy_context
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from celery import Task, signals
from redis.exceptions import RedisError

from crypto_client.domain import current_slot
from crypto_client.ingestion.maintenance import MAINTENANCE_INTERVAL_SECONDS
from crypto_client.ingestion.runtime import IngestionRuntime, open_runtime
from crypto_client.ingestion.settlements import SETTLEMENTS_INTERVAL_SECONDS
from crypto_client.ingestion.tick import TickSummary
from crypto_client.worker.celery_app import (
    BACKFILL_TASK,
    CLAIM_REFRESH_SECONDS,
    CLAIM_TTL_SECONDS,
    INGEST_TASK,
    MAINTENANCE_TASK,
    SETTLEMENTS_TASK,
    SLOT_HEADER,
    celery_app,
    settings,
)

log = structlog.get_logger(__name__)


@dataclass
class _ProcessRuntime:
    pid: int
    runner: asyncio.Runner
    resources: AsyncExitStack
    ingestion: IngestionRuntime
    redis: aioredis.Redis


_runtime: _ProcessRuntime | None = None


def _process_runtime() -> _ProcessRuntime:
    """This process's loop and clients, made on first use (after the prefork fork)."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        runner = asyncio.Runner()
        resources = AsyncExitStack()
        ingestion = runner.run(resources.enter_async_context(open_runtime(settings)))
        redis = aioredis.Redis.from_url(
            settings.celery_broker_url.get_secret_value(),
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        resources.push_async_callback(redis.aclose)
        _runtime = _ProcessRuntime(os.getpid(), runner, resources, ingestion, redis)
    return _runtime


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_runtime(**_kwargs: Any) -> None:
    global _runtime
    runtime, _runtime = _runtime, None
    if runtime is None or runtime.pid != os.getpid():
        return
    with suppress(Exception):
        runtime.runner.run(runtime.resources.aclose())
    runtime.runner.close()


@celery_app.task(name=INGEST_TASK, bind=True)
def ingest_tick_task(self: Task[[], dict[str, int] | None]) -> dict[str, int] | None:
    slot_ts = self.request.get(SLOT_HEADER) or current_slot(settings.ingest_interval_seconds)
    task_id = str(self.request.id)
    runtime = _process_runtime()
    with structlog.contextvars.bound_contextvars(
        task_id=task_id,
        slot_ts=slot_ts,
        redelivered=bool((self.request.delivery_info or {}).get("redelivered")),
    ):
        log.info("task started", task=INGEST_TASK, tickers=list(settings.tickers))
        # The runner would otherwise reuse the context of its first run, with stale task ids.
        summary = runtime.runner.run(_run_claimed(runtime, int(slot_ts), task_id), context=copy_context())
        if summary is None:
            return None
        counts = {status: summary.count(status) for status in ("stored", "duplicate", "failed")}
        level = log.info if summary.ok else log.error
        level(
            "task finished", task=INGEST_TASK, duration_ms=round(summary.duration_seconds * 1000, 1), **counts
        )
        return counts


@celery_app.task(name=BACKFILL_TASK, bind=True)
def repair_recent_task(self: Task[[], dict[str, int] | None]) -> dict[str, int] | None:
    runtime = _process_runtime()

    async def repair() -> dict[str, int]:
        reports = await runtime.ingestion.repair_recent() or []
        return {
            "filled": sum(report.filled for report in reports),
            "not_repairable": sum(report.not_repairable for report in reports),
            "history_unavailable": sum(report.history_unavailable for report in reports),
            "failed_tickers": sum(1 for report in reports if not report.ok),
        }

    lock = _Lock("crypto-client:repair-recent", max(60, settings.backfill_interval_seconds))
    return _run_locked(runtime, lock, str(self.request.id), repair)


@celery_app.task(name=MAINTENANCE_TASK, bind=True)
def maintain_storage_task(self: Task[[], dict[str, int] | None]) -> dict[str, int] | None:
    runtime = _process_runtime()

    async def maintain() -> dict[str, int]:
        report = await runtime.ingestion.maintain_storage()
        return {"created": len(report.created), "dropped": len(report.dropped), "deleted": report.deleted}

    lock = _Lock("crypto-client:maintain-storage", MAINTENANCE_INTERVAL_SECONDS)
    return _run_locked(runtime, lock, str(self.request.id), maintain)


@celery_app.task(name=SETTLEMENTS_TASK, bind=True)
def update_settlements_task(self: Task[[], dict[str, int] | None]) -> dict[str, int] | None:
    runtime = _process_runtime()

    async def settle() -> dict[str, int]:
        reports = await runtime.ingestion.update_settlements()
        return {
            "stored": sum(report.stored for report in reports),
            "failed_tickers": sum(1 for report in reports if report.error is not None),
        }

    lock = _Lock("crypto-client:update-settlements", SETTLEMENTS_INTERVAL_SECONDS)
    return _run_locked(runtime, lock, str(self.request.id), settle)


@dataclass(frozen=True)
class _Lock:
    key: str
    ttl_seconds: int


def _run_locked(
    runtime: _ProcessRuntime, lock: _Lock, task_id: str, work: Callable[[], Awaitable[dict[str, int]]]
) -> dict[str, int] | None:
    with structlog.contextvars.bound_contextvars(task_id=task_id):
        return runtime.runner.run(_locked(runtime, lock, task_id, work), context=copy_context())


async def _locked(
    runtime: _ProcessRuntime, lock: _Lock, task_id: str, work: Callable[[], Awaitable[dict[str, int]]]
) -> dict[str, int] | None:
    """Run `work` unless another worker runs it: a non-blocking lock, which lapses by itself
    if its holder dies."""
    try:
        if not await runtime.redis.set(lock.key, task_id, nx=True, ex=lock.ttl_seconds):
            log.info("already running elsewhere, skipping", lock=lock.key)
            return None
    except RedisError as exc:
        log.warning("lock unavailable, skipping this run", lock=lock.key, error=repr(exc))
        return None
    try:
        return await work()
    finally:
        with suppress(RedisError):
            if await runtime.redis.get(lock.key) == task_id:
                await runtime.redis.delete(lock.key)


async def _run_claimed(runtime: _ProcessRuntime, slot_ts: int, task_id: str) -> TickSummary | None:
    """Run the slot's tick unless another live task holds it or has already done it."""
    key = f"crypto-client:ingest-slot:{slot_ts}"
    running = f"running:{task_id}"
    try:
        claimed = await _claim(runtime.redis, key, running)
    except RedisError as exc:
        # The database's one-row-per-slot index still guards the data; go on without the claim.
        log.warning("slot claim unavailable, relying on the database", error=repr(exc))
        claimed = True
    if not claimed:
        return None

    heartbeat = asyncio.create_task(_keep_claim(runtime.redis, key, running))
    try:
        summary = await runtime.ingestion.run_tick(slot_ts)
    finally:
        heartbeat.cancel()
    with suppress(RedisError):
        # Remember the slot as done for a while so a late duplicate does not fetch again.
        await runtime.redis.set(key, f"done:{task_id}", ex=max(60, 2 * settings.ingest_interval_seconds))
    return summary


async def _claim(redis: aioredis.Redis, key: str, running: str) -> bool:
    """Take the slot. A claim left by this same message means it is being redelivered: its
    first run may be dead (its claim then lapses within CLAIM_TTL_SECONDS) or still alive
    (it keeps refreshing the claim), so wait and see which."""
    deadline = time.monotonic() + CLAIM_TTL_SECONDS + 2 * CLAIM_REFRESH_SECONDS
    while True:
        if await redis.set(key, running, nx=True, ex=CLAIM_TTL_SECONDS):
            return True
        holder = await redis.get(key)
        if holder is None:
            continue  # it lapsed between the two calls: try again
        if holder != running or time.monotonic() > deadline:
            log.info("slot already claimed, skipping", holder=holder)
            return False
        await asyncio.sleep(CLAIM_REFRESH_SECONDS / 2)


async def _keep_claim(redis: aioredis.Redis, key: str, value: str) -> None:
    while True:
        await asyncio.sleep(CLAIM_REFRESH_SECONDS)
        try:
            await redis.set(key, value, ex=CLAIM_TTL_SECONDS)
        except RedisError as exc:
            log.warning("could not refresh the slot claim", error=repr(exc))
