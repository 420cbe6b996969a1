"""The Celery tasks, one per job of `ingestion.jobs.JOBS`: the ingest tick claims its slot in
Redis, every other job takes a lock, and each runs the same function as the embedded scheduler.

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
from crypto_client.ingestion.jobs import JOBS, PeriodicJob
from crypto_client.ingestion.runtime import IngestionRuntime, open_runtime
from crypto_client.worker.celery_app import (
    CLAIM_REFRESH_SECONDS,
    CLAIM_TTL_SECONDS,
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


TaskResult = dict[str, int] | None


def _slot_task(job: PeriodicJob[Any]) -> Callable[[Task[[], TaskResult]], TaskResult]:
    """The task of a job that runs once per slot: it claims its slot, then runs."""

    def run_slot(self: Task[[], TaskResult]) -> TaskResult:
        period = job.period_seconds(settings)
        slot_ts = int(self.request.get(SLOT_HEADER) or current_slot(period))
        task_id = str(self.request.id)
        runtime = _process_runtime()
        with structlog.contextvars.bound_contextvars(
            task_id=task_id,
            slot_ts=slot_ts,
            redelivered=bool((self.request.delivery_info or {}).get("redelivered")),
        ):
            log.info("task started", task=job.task, tickers=list(settings.tickers))
            # The runner would otherwise reuse the context of its first run, with stale task ids.
            work = _run_claimed(runtime, job, slot_ts, task_id)
            ran = runtime.runner.run(work, context=copy_context())
            if ran is None:
                return None
            counts, duration_seconds = ran
            level = log.error if counts.get("failed") else log.info
            level(
                "task finished",
                task=job.task,
                duration_ms=round(duration_seconds * 1000, 1),
                **counts,
            )
            return counts

    return run_slot


def _locked_task(job: PeriodicJob[Any]) -> Callable[[Task[[], TaskResult]], TaskResult]:
    """The task of every other job: it runs unless another worker holds the job's lock."""

    def run_locked(self: Task[[], TaskResult]) -> TaskResult:
        runtime = _process_runtime()
        task_id = str(self.request.id)

        async def work() -> dict[str, int]:
            return job.summarise(await job.run(runtime.ingestion, int(time.time())))

        lock = _Lock(job.lock_key, job.lock_seconds(settings))
        with structlog.contextvars.bound_contextvars(task_id=task_id):
            return runtime.runner.run(_locked(runtime, lock, task_id, work), context=copy_context())

    return run_locked


# Every job of the table is a task, by its name.
TASKS = {
    job.name: celery_app.task(name=job.task, bind=True)(
        _slot_task(job) if job.claims_slot else _locked_task(job)
    )
    for job in JOBS
}


@dataclass(frozen=True)
class _Lock:
    key: str
    ttl_seconds: int


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


async def _run_claimed(
    runtime: _ProcessRuntime, job: PeriodicJob[Any], slot_ts: int, task_id: str
) -> tuple[dict[str, int], float] | None:
    """Run the slot's job unless another live task holds the slot or has already done it:
    the job's counts and how long it took."""
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
        started = time.monotonic()
        counts = job.summarise(await job.run(runtime.ingestion, slot_ts))
        duration_seconds = time.monotonic() - started
    finally:
        heartbeat.cancel()
    with suppress(RedisError):
        # Remember the slot as done for a while so a late duplicate does not fetch again.
        await runtime.redis.set(key, f"done:{task_id}", ex=max(60, 2 * job.period_seconds(settings)))
    return counts, duration_seconds


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
