"""The periodic jobs come from one table: Celery beat's schedule, the Celery tasks and the
embedded scheduler of `crypto-client serve` each have exactly the entries of `JOBS`."""

import dataclasses
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from crypto_client.ingestion import embedded_scheduler
from crypto_client.ingestion.jobs import JOBS
from crypto_client.ingestion.runtime import IngestionRuntime
from tests.support.settings import make_settings
from tests.support.waiting import wait_until_async

# Beat's schedule and the registered tasks, as a fresh process makes them from the settings.
_PROBE = """
import json
from crypto_client.worker import tasks
from crypto_client.worker.celery_app import celery_app
print(json.dumps({
    "beat": {
        name: [entry["task"], entry["schedule"].interval_seconds, entry["options"].get("expires")]
        for name, entry in celery_app.conf.beat_schedule.items()
    },
    "tasks": sorted(name for name in celery_app.tasks if not name.startswith("celery.")),
    "by_job": {name: task.name for name, task in tasks.TASKS.items()},
}))
"""


def _celery_view(**env: str) -> Any:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("backfill_interval", ["300", "0"])
def test_beat_and_the_celery_tasks_are_the_tables_entries(backfill_interval: str) -> None:
    view = _celery_view(INGEST_INTERVAL_SECONDS="30", BACKFILL_INTERVAL_SECONDS=backfill_interval)
    settings = make_settings(
        "sqlite:///unused.db", ingest_interval_seconds=30, backfill_interval_seconds=int(backfill_interval)
    )
    scheduled = [job for job in JOBS if job.period_seconds(settings)]
    assert view["beat"] == {
        job.name: [job.task, job.period_seconds(settings), job.period_seconds(settings)] for job in scheduled
    }
    # Every beat entry expires after one period: a run not started by then is dropped.
    assert all(entry[2] for entry in view["beat"].values())
    # A job that is off has no beat entry, but its task is still there to be called by hand.
    assert view["tasks"] == sorted(job.task for job in JOBS)
    assert view["by_job"] == {job.name: job.task for job in JOBS}
    if backfill_interval == "0":
        assert "repair-recent" not in view["beat"]


@pytest.mark.parametrize("backfill_interval", [300, 0])
async def test_the_embedded_scheduler_runs_the_tables_entries(
    backfill_interval: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every scheduler runs its job at once on start: in a moment each job that is on has run
    once, for the slot of its own period."""
    runs: list[tuple[str, int]] = []

    def recording(name: str) -> Callable[[IngestionRuntime, int], Awaitable[None]]:
        async def run(_runtime: IngestionRuntime, slot: int) -> None:
            runs.append((name, slot))

        return run

    recorders = tuple(dataclasses.replace(job, run=recording(job.name)) for job in JOBS)
    monkeypatch.setattr(embedded_scheduler, "JOBS", recorders)
    settings = make_settings(
        f"sqlite:///{tmp_path / 'jobs.db'}",
        deribit_rpc_url="http://127.0.0.1:1/api/v2",
        ingest_interval_seconds=30,
        backfill_interval_seconds=backfill_interval,
    )
    scheduled = {job.name: job.period_seconds(settings) for job in JOBS if job.period_seconds(settings)}

    async with embedded_scheduler.embedded_ingestion(settings):

        async def all_ran() -> bool:
            return len(runs) >= len(scheduled)

        await wait_until_async(all_ran, 10, what="every scheduled job to run once")
    assert sorted(name for name, _ in runs) == sorted(scheduled)
    for name, slot in runs:
        assert slot % scheduled[name] == 0, (name, slot)
