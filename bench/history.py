"""Back-fill from trade history: one ticker, 60 s slots, against the simulator with
Deribit-like latency (50 ms a request) and the client's budget of 20 requests a second.

    uv run python -m bench.history              # one year; appends to bench/RESULTS.md
    uv run python -m bench.history --days 30    # a shorter span, extrapolated to a year

`crypto-client backfill --since` runs as its own process on PostgreSQL; its peak RSS is read
from the kernel (`ru_maxrss` of the waited-for child). The simulator's trade density is its
own (a perpetual trading in 85 % of minutes, 1 to 3 trades, and an expired future); on the
real Deribit the perpetual trades many times a minute, so the same slots need more pages:
the year's wall time there is derived from requests per slot measured here and the budget.
"""

import argparse
import asyncio
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx

from bench.common import ADMIN_URL, HERE, WORK
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import SimServer

TICKER = "btc_usd"
INTERVAL = 60
LATENCY_MS = 50
REQUESTS_PER_SECOND = 20
TRADES = "public/get_last_trades_by_instrument_and_time"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=365)
    days = parser.parse_args().days
    WORK.mkdir(parents=True, exist_ok=True)
    today = int(time.time()) // 86_400 * 86_400
    since = datetime.fromtimestamp(today - (days + 1) * 86_400, UTC).date().isoformat()
    until = datetime.fromtimestamp(today - 2 * 86_400, UTC).date().isoformat()
    sim = SimServer(WORK, 0, "--latency-ms", str(LATENCY_MS))
    url = asyncio.run(create_pg_database(ADMIN_URL))
    try:
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "TICKERS": TICKER,
            "INGEST_INTERVAL_SECONDS": str(INTERVAL),
            "DERIBIT_RPC_URL": sim.rpc_url,
            "DERIBIT_HISTORY_URL": f"{sim.url}/history/api/v2",
            "DERIBIT_HISTORY_REQUESTS_PER_SECOND": str(REQUESTS_PER_SECOND),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "WARNING",
        }
        started = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "crypto_client", "backfill", "--since", since, "--until", until],
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.monotonic() - started
        if run.returncode != 0:
            raise SystemExit(f"backfill failed: {run.stderr[-2000:]}")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        stats = httpx.get(f"{sim.url}/_sim/stats").json()["requests"]
        requests = sum(stats.values())
        trade_requests = stats.get(TRADES, 0)
        filled = int(run.stdout.split("filled from trades")[1].split()[0])
        slots = days * 86_400 // INTERVAL
    finally:
        sim.stop()
        asyncio.run(drop_pg_database(url, ADMIN_URL))

    per_thousand = requests / slots * 1000
    year_slots = 365 * 86_400 // INTERVAL
    year_at_budget = year_slots * requests / slots / REQUESTS_PER_SECOND
    lines = [
        "",
        "## Back-fill from trade history (`uv run python -m bench.history`)",
        "",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())};"
        f" {os.cpu_count()} cores ({cpu_model()});"
        f" one ticker, {days} days of {INTERVAL} s slots ({slots:,} slots), PostgreSQL; simulator latency"
        f" {LATENCY_MS} ms, client budget {REQUESTS_PER_SECOND} requests/s",
        "",
        "| Measure | Result |",
        "| --- | --- |",
        f"| Wall time | {seconds:,.1f} s ({slots / seconds:,.0f} slots examined/s) |",
        f"| Slots filled from trades | {filled:,} ({filled / seconds:,.0f} filled/s) |",
        f"| Requests | {requests:,} ({trade_requests:,} trade pages), {per_thousand:.1f} per 1,000 slots |",
        f"| Peak RSS of `crypto-client backfill` | {peak_mb:,.0f} MB (goal: under 200 MB) |",
        f"| A year on the real Deribit at {REQUESTS_PER_SECOND} requests/s, at this request density"
        f" | {year_at_budget / 60:,.1f} min ({year_slots * requests / slots:,.0f} requests) |",
        "",
        "The simulator's perpetual trades 1 to 3 times in 85 % of minutes; BTC-PERPETUAL trades far"
        " more often, so a real page of 1,000 trades spans minutes, not hours. With the back-fill"
        " skipping from a slot's first trade to the next missing slot, the worst case is one page per"
        f" missing slot: {year_slots:,} requests a year, {year_slots / REQUESTS_PER_SECOND / 3600:,.1f} h"
        f" at {REQUESTS_PER_SECOND} requests/s.",
    ]
    if days != 365:
        lines.append(
            f"The span was {days} days, not a year; the year's figures are extrapolated linearly"
            f" ({365 / days:.2f}x) from it."
        )
    text = "\n".join(lines) + "\n"
    with (HERE / "RESULTS.md").open("a") as results:
        results.write(text)
    print(text)


if __name__ == "__main__":
    main()
