"""The Celery app: `celery -A crypto_client.worker.celery_app worker|beat`.

Every setting below is chosen for one periodic, idempotent task over Redis.
"""

import os
import sys
import time
from datetime import datetime, timedelta
from typing import Any

import structlog
from celery import Celery, signals
from celery.beat import Service as Beat
from celery.schedules import schedstate, schedule

from crypto_client import metrics
from crypto_client.config import Settings, get_settings
from crypto_client.domain import current_slot
from crypto_client.ingestion.jobs import JOBS
from crypto_client.logging import setup_logging
from crypto_client.worker.broker import use_for_redis_urls

# The tasks that run once per slot: the slot is stamped on the message when it is published.
SLOT_JOBS = {job.task: job for job in JOBS if job.claims_slot}
SLOT_HEADER = "slot_ts"
# A running tick refreshes its Redis claim every CLAIM_REFRESH_SECONDS; a claim not refreshed
# for CLAIM_TTL_SECONDS belongs to a dead worker and may be taken over.
CLAIM_TTL_SECONDS = 3
CLAIM_REFRESH_SECONDS = 1.0

log = structlog.get_logger(__name__)
settings = get_settings()


def restore_interval(settings: Settings) -> int:
    return max(1, settings.celery_visibility_timeout // 3)


def killed_worker_recovery_seconds(settings: Settings) -> int:
    """The longest a slot whose worker was SIGKILLed waits to be run again: the message's
    visibility timeout, the restore check, the dead run's claim lapsing, and a second to fetch."""
    return settings.celery_visibility_timeout + restore_interval(settings) + CLAIM_TTL_SECONDS + 1


class SlotSchedule(schedule):
    """Due once per slot, right after the slot starts on the wall clock.

    A plain interval drifts from whenever beat started, so two runs could land in one slot;
    aligning to `floor(now / interval)` gives each run its own slot.
    """

    def __init__(self, interval_seconds: int) -> None:
        super().__init__(run_every=timedelta(seconds=interval_seconds))
        self.interval_seconds = interval_seconds

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = time.time()
        slot = current_slot(self.interval_seconds, now)
        last_slot = current_slot(self.interval_seconds, self.maybe_make_aware(last_run_at).timestamp())
        return schedstate(is_due=last_slot < slot, next=slot + self.interval_seconds - now)

    def __reduce__(self) -> tuple[type["SlotSchedule"], tuple[int]]:
        return self.__class__, (self.interval_seconds,)


# Before any broker connection: a Redis restart with a tick in flight must not end the worker.
use_for_redis_urls()
celery_app = Celery("crypto_client", include=["crypto_client.worker.tasks"])
app = celery_app  # the name `celery -A crypto_client.worker.celery_app` looks for first
_result_backend = settings.celery_result_backend
celery_app.conf.update(
    broker_url=settings.celery_broker_url.get_secret_value(),
    # Nothing reads task results; a backend is only used when one is configured.
    result_backend=_result_backend.get_secret_value() if _result_backend else None,
    task_ignore_result=_result_backend is None,
    timezone="UTC",
    enable_utc=True,
    # Ack after the task ran, so a worker that dies mid-tick leaves the message to be
    # delivered again; the slot claim and ON CONFLICT writes make the rerun harmless.
    task_acks_late=True,
    # A pool process killed mid-task (OOM, SIGKILL) requeues its message at once.
    task_reject_on_worker_lost=True,
    # One message at a time per process: a waiting tick is never stuck behind a slow one.
    worker_prefetch_multiplier=1,
    # Hard stop for a hung tick: the longest database wait plus a fetch budget.
    task_time_limit=settings.ingest_max_write_delay_seconds + 120,
    # Keep retrying the broker, at start-up too, instead of exiting: Redis restarts heal.
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    broker_transport_options={
        # How long an unacked message (its worker died) waits before another worker gets it.
        "visibility_timeout": settings.celery_visibility_timeout,
        # Look for such messages often enough to rerun them within their slot.
        "unacked_restore_interval": restore_interval(settings),
        "unacked_restore_throttle": 1,
        # Notice a dead connection (Redis restarted, NAT dropped it) instead of waiting on it.
        "health_check_interval": 10,
        "socket_keepalive": True,
        "socket_timeout": 15,
        "socket_connect_timeout": 5,
    },
    # Our setup_logging() formats every line; Celery must not replace the root handler.
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    # One entry per job of the table; a run not started within its period is dropped, not
    # piled up behind others (the next one supersedes it).
    beat_schedule={
        job.name: {
            "task": job.task,
            "schedule": SlotSchedule(period),
            "options": {"expires": period},
        }
        for job in JOBS
        if (period := job.period_seconds(settings))
    },
)


@signals.setup_logging.connect
def _setup_logging(**_kwargs: Any) -> None:
    # Connecting to this signal also stops Celery from configuring logging its own way.
    setup_logging(settings.log_level, settings.log_format)


@signals.before_task_publish.connect
def _stamp_slot(sender: str | None = None, headers: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    # The slot is fixed when the tick is published, so a redelivered message reruns the same
    # slot rather than the one current when it finally runs.
    job = SLOT_JOBS.get(sender or "")
    if job is not None and headers is not None:
        headers.setdefault(SLOT_HEADER, current_slot(job.period_seconds(settings)))


@signals.worker_init.connect
@signals.beat_init.connect
def _wait_for_what_it_needs(sender: object = None, **_kwargs: Any) -> None:
    # After Celery has parsed its options, before it says "ready" or consumes anything. Beat
    # only publishes: the broker is all it needs; a worker writes too. SystemExit is the one
    # exception Celery's signal dispatch lets through.
    from crypto_client.startup import StartupError, broker_need, database_need, require

    needs = [broker_need(settings)]
    if not isinstance(sender, Beat):
        needs.append(database_need(settings))
    try:
        require(needs, wait_seconds=settings.startup_wait_seconds)
    except StartupError as exc:
        print(f"crypto-client: {exc}\n  hint: {exc.hint}", file=sys.stderr)
        raise SystemExit(1) from None


@signals.worker_init.connect
@signals.beat_init.connect
def _warn_about_unrecoverable_slots(**_kwargs: Any) -> None:
    recovery = killed_worker_recovery_seconds(settings)
    if recovery >= settings.ingest_interval_seconds:
        log.warning(
            "a slot whose worker is killed cannot be recovered within the slot",
            interval_seconds=settings.ingest_interval_seconds,
            recovery_seconds=recovery,
            visibility_timeout_seconds=settings.celery_visibility_timeout,
            hint="such a slot is reported late or expired; use INGEST_INTERVAL_SECONDS of 10 or more"
            " (and an unset CELERY_VISIBILITY_TIMEOUT_SECONDS) to have it rerun in time",
        )


@signals.worker_init.connect
@signals.beat_init.connect
def _serve_metrics(**_kwargs: Any) -> None:
    # In the worker's main process: its pool processes record into PROMETHEUS_MULTIPROC_DIR
    # (set by `crypto-client worker`), so this one serves them all.
    metrics.serve_on_port(settings.metrics_port)


@signals.worker_process_shutdown.connect
def _forget_pool_process(**_kwargs: Any) -> None:
    metrics.mark_process_dead(os.getpid())


@signals.task_revoked.connect
def _report_expired_tick(request: Any = None, expired: bool = False, **_kwargs: Any) -> None:
    # Celery discards an expired message with a debug line; a slot that was never ingested
    # must be visible.
    if expired and getattr(request, "name", None) in SLOT_JOBS:
        headers = getattr(request, "request_dict", None) or {}
        log.warning(
            "tick expired before a worker ran it: slot not ingested",
            slot_ts=headers.get(SLOT_HEADER),
            task_id=getattr(request, "id", None),
        )
