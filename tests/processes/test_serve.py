"""`crypto-client serve`: the whole service in one process on a SQLite file."""

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.writer import PriceWriter
from tests.support.services import ApiServer, SimServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def test_serve_ingests_and_answers_then_stops_cleanly(sim: SimServer, tmp_path: Path) -> None:
    database = tmp_path / "embedded.db"
    env = {
        "DATABASE_URL": f"sqlite:///{database}",
        "DERIBIT_RPC_URL": sim.rpc_url,
        "TICKERS": "btc_usd,eth_usd,drbfix-btc_usdc",
        "INGEST_INTERVAL_SECONDS": "1",
        "LOG_FORMAT": "json",
    }
    sim.pin(eth_usd="2291.40")
    server = ApiServer.command("serve", env, tmp_path, ready_path="/health")
    try:

        def latest(ticker: str) -> dict[str, Any] | None:
            response = server.get("/prices/latest", ticker=ticker)
            body: dict[str, Any] | None = response.json() if response.status_code == 200 else None
            return body

        for ticker in ("btc_usd", "eth_usd", "drbfix-btc_usdc"):
            found = wait_until(lambda t=ticker: latest(t), 15, what=f"a price for {ticker}")  # type: ignore[misc]
            assert found is not None
            body = found
            assert body["ticker"] == ticker
            assert abs(int(body["ts"]) - time.time()) < 30
        assert '"price":2291.40' in server.get("/prices/latest", ticker="eth_usd").text
        wait_until(lambda: len(server.get("/prices", ticker="btc_usd").json()) >= 3, 15, what="3 ticks")

        server.process.popen.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        server.process.popen.wait(10)
        assert time.monotonic() - stopped < 3
    finally:
        server.stop()

    assert server.process.popen.returncode == 0
    lines = [json.loads(line) for line in server.output.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "embedded scheduler started" in events
    assert "embedded scheduler stopped" in events
    assert any(line["event"] == "request" and line["path"] == "/prices/latest" for line in lines)
    assert database.exists()


def test_serve_stores_local_time_when_deribits_clock_lies(sim: SimServer, tmp_path: Path) -> None:
    sim.faults(clock_offset_seconds=7200)
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'clock.db'}",
        "DERIBIT_RPC_URL": sim.rpc_url,
        "TICKERS": "btc_usd",
        "INGEST_INTERVAL_SECONDS": "1",
        "LOG_FORMAT": "json",
    }
    with ApiServer.command("serve", env, tmp_path, ready_path="/health") as server:

        def three_rows() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = server.get("/prices", ticker="btc_usd").json()
            return rows if len(rows) >= 3 else []

        rows = wait_until(three_rows, 20, what="3 rows")
    assert all(abs(row["ts"] - time.time()) < 30 for row in rows)
    assert "source time not used" in server.output


def test_serve_runs_one_repair_at_a_time(tmp_path: Path) -> None:
    """Deribit's history answers slower than the repair interval: a repair outlasts its
    interval, and the next runs are skipped instead of asking Deribit again beside it."""
    database = tmp_path / "repair.db"
    url = f"sqlite:///{database}"
    migrations.upgrade(url)

    async def track() -> None:
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                await PriceWriter(connection).track(["btc_usd"], int(time.time()) - 600)
        finally:
            await engine.dispose()

    asyncio.run(track())  # ten minutes of gaps to repair
    sim = SimServer(tmp_path, 0, "--chart-step-scale", "0.1", "--latency-ms", "3000")
    env = {
        "DATABASE_URL": url,
        "DERIBIT_RPC_URL": sim.rpc_url,
        "TICKERS": "btc_usd",
        "INGEST_INTERVAL_SECONDS": "60",
        "INGEST_MAX_WRITE_DELAY_SECONDS": "0",
        "DERIBIT_MAX_RETRIES": "0",
        "BACKFILL_INTERVAL_SECONDS": "1",
        "LOG_FORMAT": "json",
    }
    try:
        with ApiServer.command("serve", env, tmp_path, ready_path="/health") as server:
            wait_until(lambda: '"backfill finished"' in server.output, 30, what="the first repair")
            chart = sim.stats()["methods"]["public/get_index_chart_data"]
            output = server.output
    finally:
        sim.stop()
    assert chart["max_in_flight"] == 1, chart
    assert '"repair still running, skipping this run"' in output
    # One history request per repair that had gaps to fill (every gap is in the 1h range).
    finished = [json.loads(line) for line in output.splitlines() if '"backfill finished"' in line]
    assert chart["requests"] == sum(1 for line in finished if line["missing"]), chart
