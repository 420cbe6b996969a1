"""The benchmark's smoke run: every scenario still runs end to end (no timing is judged).

It checks the benchmark, not the service, so it is CI's own step (`make bench-smoke`), outside
the suite and its time budget, as the chaos run is."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.databases import pg_admin_url

pytestmark = [pytest.mark.slow, pytest.mark.bench]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_run_writes_a_complete_report(postgresql_url: str) -> None:
    # postgresql_url makes a missing server skip (locally) or fail (CI) like every other test.
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"],
        cwd=ROOT,
        env={"BENCH_DATABASE_URL": pg_admin_url(), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (ROOT / "bench" / ".work" / "RESULTS-smoke.md").read_text()
    for scenario in ("/prices/latest", "first page", "cursor at", "/prices/range", "framework ceiling"):
        assert scenario in report
    for measure in (
        "Ingestion tick",
        "Naive sequential",
        "Bulk insert",
        "full-history walk",
        "Freshness",
        "Stream consumer",
    ):
        assert measure in report
    assert "all scenarios: 0." in report
