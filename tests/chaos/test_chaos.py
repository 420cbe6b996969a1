"""The short seeded chaos runs CI makes (`uv run pytest -m chaos tests/chaos`): every fault
kind on each backend, then the independent checker. Deselected from the default run."""

import os
from pathlib import Path

import pytest

from tests.chaos.harness import Summary, execute, postgres_run, sqlite_run

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(240)]

SEED = int(os.environ.get("CHAOS_SEED", "22"))


def _judge(summary: Summary) -> None:
    print(summary.table())
    for note in summary.report.notes:
        print("note:", note)
    if not summary.report.ok:
        print("the processes' logs around the findings:", *summary.logs_around_findings(), sep="\n")
    assert summary.report.ok, "\n".join(f.line() for f in summary.report.findings[:40])


def test_chaos_postgresql(tmp_path: Path) -> None:
    with postgres_run(tmp_path, SEED) as run:
        summary = execute(run, fault_seconds=30, quiet_seconds=10)
    assert sum(summary.faults.values()) >= 5
    _judge(summary)


def test_chaos_sqlite(tmp_path: Path) -> None:
    with sqlite_run(tmp_path, SEED) as run:
        summary = execute(run, fault_seconds=20, quiet_seconds=8)
    assert sum(summary.faults.values()) >= 3
    _judge(summary)
