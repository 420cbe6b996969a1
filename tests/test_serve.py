"""`crypto-client serve`: the whole service in one process on a SQLite file."""

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

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
