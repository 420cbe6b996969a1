"""`crypto-client serve`: the whole service in one process on a SQLite file."""

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.services import Process, SimServer, crypto_client, free_port, wait_until

pytestmark = pytest.mark.slow


def test_serve_ingests_and_answers_then_stops_cleanly(sim: SimServer, tmp_path: Path) -> None:
    port = free_port()
    database = tmp_path / "embedded.db"
    env = {
        "DATABASE_URL": f"sqlite:///{database}",
        "DERIBIT_RPC_URL": sim.rpc_url,
        "TICKERS": "btc_usd,eth_usd,drbfix-btc_usdc",
        "INGEST_INTERVAL_SECONDS": "1",
        "LOG_FORMAT": "json",
    }
    sim.pin(eth_usd="2291.40")
    process = Process(crypto_client("serve", "--port", str(port)), env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/health").status_code == 200, 30, what="serve")

        def latest(ticker: str) -> dict[str, object] | None:
            response = httpx.get(f"{base}/prices/latest", params={"ticker": ticker})
            return response.json() if response.status_code == 200 else None

        for ticker in ("btc_usd", "eth_usd", "drbfix-btc_usdc"):
            body = wait_until(lambda t=ticker: latest(t), 15, what=f"a price for {ticker}")
            assert body["ticker"] == ticker
            assert abs(int(body["ts"]) - time.time()) < 30
        assert '"price":2291.40' in httpx.get(f"{base}/prices/latest", params={"ticker": "eth_usd"}).text
        wait_until(lambda: len(httpx.get(f"{base}/prices", params={"ticker": "btc_usd"}).json()) >= 3, 15)

        process.popen.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        process.popen.wait(10)
        assert time.monotonic() - stopped < 3
    finally:
        process.stop()

    assert process.popen.returncode == 0
    lines = [json.loads(line) for line in process.output.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "embedded scheduler started" in events
    assert "embedded scheduler stopped" in events
    assert any(line["event"] == "request" and line["path"] == "/prices/latest" for line in lines)
    assert database.exists()
