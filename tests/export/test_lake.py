"""`crypto-client export --format parquet`: the data lake on disk, read back exactly by DuckDB
and Polars, with final days kept and checked on reruns; on PostgreSQL and on SQLite."""

import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import polars
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.engine import create_engine
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice
from tests.support import launcher
from tests.support.databases import empty_database
from tests.support.services import crypto_client

D0 = 1_704_067_200  # 2024-01-01T00:00:00Z
DAY = 86_400
EXTREMES = ["99999999999999999999.999999999999999999", "0.000000000000000001", "2291.40"]


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    await empty_database(db_url)
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()
    await empty_database(db_url)


async def store(engine: AsyncEngine, prices: list[NewPrice]) -> None:
    async with engine.begin() as connection:
        await PriceWriter(connection).insert_many(prices)


def export(db_url: str, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATABASE_URL": db_url, "TICKERS": "btc_usd", **env}
    return launcher.run(
        crypto_client("export", "--format", "parquet", "--out", str(out), *args),
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def manifest(out: Path) -> dict[str, Any]:
    files: dict[str, Any] = json.loads((out / "manifest.json").read_text(), parse_float=Decimal)["files"]
    return files


def duckdb_rows(out: Path) -> list[tuple[Any, ...]]:
    query = "SELECT ticker, ts, price, source FROM read_parquet(?) ORDER BY ticker, ts"
    return duckdb.execute(query, [f"{out}/*/*.parquet"]).fetchall()


def polars_rows(out: Path) -> list[tuple[Any, ...]]:
    frame = polars.scan_parquet(f"{out}/*/*.parquet").select("ticker", "ts", "price", "source")
    return list(frame.sort("ticker", "ts").collect().iter_rows())


@pytest.mark.slow
async def test_lake_layout_manifest_and_exact_reads(engine: AsyncEngine, db_url: str, tmp_path: Path) -> None:
    # btc_usd: all of 2024-01-01 (final once written), 100 minutes of 2024-01-02.
    whole_day = [NewPrice("btc_usd", Decimal(f"4{m}.25"), D0 + m * 60, D0 + m * 60) for m in range(1440)]
    partial_day = [
        NewPrice("btc_usd", Decimal("50000"), D0 + DAY + m * 60, D0 + DAY + m * 60) for m in range(100)
    ]
    extremes = [NewPrice("eth_usd", Decimal(p), D0 + i * 60, D0 + i * 60) for i, p in enumerate(EXTREMES)]
    await store(engine, whole_day + partial_day + extremes)
    expected = sorted((p.ticker, p.ts, p.price, p.source) for p in whole_day + partial_day + extremes)
    out = tmp_path / "lake"

    first = export(db_url, out)
    assert first.returncode == 0, first.stderr
    assert "3 files written" in first.stdout
    written = sorted(str(p.relative_to(out)) for p in out.glob("*/*.parquet"))
    assert written == [
        "btc_usd/2024-01-01.parquet",
        "btc_usd/2024-01-02.parquet",
        "eth_usd/2024-01-01.parquet",
    ]
    files = manifest(out)
    assert sorted(files) == written
    day1, day2 = files["btc_usd/2024-01-01.parquet"], files["btc_usd/2024-01-02.parquet"]
    assert (day1["rows"], day1["first_ts"], day1["last_ts"]) == (1440, D0, D0 + 1439 * 60)
    assert day1["coverage"] == 1
    assert day1["immutable"] is True
    assert day1["quality"]["missing_slots"] == 0
    assert (day2["rows"], day2["coverage"], day2["immutable"]) == (100, Decimal("0.069444"), False)
    assert day2["quality"]["longest_gap"]["slots"] == 1340
    for name, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert duckdb_rows(out) == expected
    assert polars_rows(out) == expected

    # A rerun keeps the final day (its hash checked) and rewrites the others.
    before = (out / "btc_usd/2024-01-01.parquet").stat().st_mtime_ns
    more = NewPrice("btc_usd", Decimal("50001"), D0 + DAY + 100 * 60, D0 + DAY + 100 * 60)
    await store(engine, [more])
    second = export(db_url, out)
    assert second.returncode == 0, second.stderr
    assert "1 final files unchanged" in second.stdout
    assert (out / "btc_usd/2024-01-01.parquet").stat().st_mtime_ns == before
    assert manifest(out)["btc_usd/2024-01-02.parquet"]["rows"] == 101
    assert duckdb_rows(out) == sorted([*expected, (more.ticker, more.ts, more.price, more.source)])

    # A final file that changed is reported, not silently replaced.
    changed = out / "btc_usd/2024-01-01.parquet"
    changed.write_bytes(changed.read_bytes()[:-10] + b"0123456789")
    third = export(db_url, out)
    assert third.returncode == 1
    assert f"{changed}: its sha256 differs" in third.stderr


@pytest.mark.slow
async def test_lake_of_chosen_tickers_and_bounds(engine: AsyncEngine, db_url: str, tmp_path: Path) -> None:
    await store(
        engine,
        [
            NewPrice(t, Decimal("1.5"), D0 + d * DAY + 60, None)
            for t in ("btc_usd", "eth_usd")
            for d in range(3)
        ],
    )
    out = tmp_path / "some"
    done = export(
        db_url, out, "--ticker", "ETH_USD", "--from-ts", str(D0 + DAY), "--to-ts", str(D0 + 2 * DAY - 1)
    )
    assert done.returncode == 0, done.stderr
    assert sorted(manifest(out)) == ["eth_usd/2024-01-02.parquet"]
    assert duckdb_rows(out) == [("eth_usd", D0 + DAY + 60, Decimal("1.5"), "poll")]
    bad = export(db_url, out, "--ticker", "bad ticker!")
    assert bad.returncode == 2
    assert "--ticker" in bad.stderr
    backwards = export(db_url, out, "--from-ts", "10", "--to-ts", "5")
    assert backwards.returncode == 1
    assert "--from-ts (10) must not be after --to-ts (5)" in backwards.stderr


async def test_lake_shows_a_progress_bar_on_a_terminal(
    engine: AsyncEngine, db_url: str, tmp_path: Path
) -> None:
    await store(engine, [NewPrice("btc_usd", Decimal("2"), D0 + d * DAY, None) for d in range(3)])
    shown = export(db_url, tmp_path / "bar", TTY_COMPATIBLE="1", COLUMNS="100")
    assert shown.returncode == 0, shown.stderr
    assert "btc_usd" in shown.stderr
    assert "3/3" in shown.stderr
    quiet = export(db_url, tmp_path / "quiet")
    assert "3/3" not in quiet.stderr


def test_lake_of_an_unmigrated_database_is_one_line(tmp_path: Path) -> None:
    done = export(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path / "lake")
    assert done.returncode == 1
    assert "it is not migrated yet: run `crypto-client migrate`" in done.stderr
    assert "Traceback" not in done.stderr
