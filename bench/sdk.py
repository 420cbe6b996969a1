"""The SDK's full-history walk of one ticker against a hand-written httpx loop over the same
pages (goal: within 10 % of its rows/s).

    uv run python -m bench.sdk                # 500,000 rows of one ticker
    uv run python -m bench.sdk --rows 20000   # a quick check that it still runs

Both walk `/prices/range?limit=10000` by its `Link` headers against the API as
`crypto-client api` serves it (granian, one worker) on a fresh PostgreSQL database, and both
read every price as an exact `Decimal`; the SDK also builds a typed object per row. They
alternate, `--rounds` times each, and the best round of each counts.
"""

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal

import asyncpg
import httpx
from crypto_client_sdk import Client

from bench.common import ADMIN_URL, WORK
from bench.database import load_history
from crypto_client.db import migrations
from crypto_client.sim.prices import INDEXES
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import ApiServer, free_port

TICKER = next(iter(INDEXES))
PAGE = 10_000
GOAL = 0.9


def walk_by_hand(base_url: str) -> tuple[int, Decimal]:
    """What a user would write without the SDK: follow the links, parse the prices exactly."""
    rows, last = 0, Decimal(0)
    with httpx.Client(base_url=base_url, timeout=60) as http:
        response = http.get("/prices/range", params={"ticker": TICKER, "limit": PAGE})
        while True:
            response.raise_for_status()
            for row in json.loads(response.content, parse_float=Decimal):
                rows += 1
                last = row["price"]
            link = response.links.get("next")
            if link is None:
                return rows, last
            response = http.get(link["url"])


def walk_with_sdk(base_url: str) -> tuple[int, Decimal]:
    rows, last = 0, Decimal(0)
    with Client(base_url, timeout=60) as client:
        for row in client.prices(TICKER):
            rows += 1
            last = row.price
    return rows, last


def timed(walk: Callable[[str], tuple[int, Decimal]], base_url: str) -> tuple[float, int, Decimal]:
    started = time.perf_counter()
    rows, last = walk(base_url)
    return time.perf_counter() - started, rows, last


async def create_database(rows: int) -> str:
    url = await create_pg_database(ADMIN_URL, prefix="cc_bench_sdk", migrate=False)
    await asyncio.to_thread(migrations.upgrade, url, "0004")
    connection = await asyncpg.connect(url)
    try:
        await load_history(connection, [TICKER], rows)
    finally:
        await connection.close()
    await asyncio.to_thread(migrations.upgrade, url)
    return url


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    started = time.monotonic()
    url = asyncio.run(create_database(args.rows))
    print(f"loaded {args.rows:,} rows of {TICKER} in {time.monotonic() - started:.1f}s", flush=True)
    port = free_port()
    env = {"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "API_STATEMENT_TIMEOUT_SECONDS": "60"}
    command = [sys.executable, "-m", "bench.server", str(port), "granian"]
    best: dict[str, float] = {}
    try:
        with ApiServer(command, env, WORK / f"sdk-api-{port}.log", port=port) as api:
            for _ in range(args.rounds):
                for name, walk in (("httpx loop", walk_by_hand), ("SDK", walk_with_sdk)):
                    seconds, rows, last = timed(walk, api.url)
                    if rows != args.rows:
                        sys.exit(f"{name} walked {rows:,} rows, not {args.rows:,}")
                    rate = rows / seconds
                    print(f"{name}: {rows:,} rows in {seconds:.2f}s ({rate:,.0f} rows/s), last price {last}")
                    best[name] = min(best.get(name, seconds), seconds)
    finally:
        asyncio.run(drop_pg_database(url, ADMIN_URL))
    by_hand, sdk = args.rows / best["httpx loop"], args.rows / best["SDK"]
    ratio = sdk / by_hand
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    machine = f"nproc {nproc} ({os.cpu_count()} CPUs), {cpu_model()}"
    print(
        f"\n| Walk of {args.rows:,} rows of one ticker, pages of {PAGE:,} "
        f"| rows/s (best of {args.rounds}) |\n"
        "| --- | ---: |\n"
        f"| hand-written httpx loop (`json.loads`, `Decimal` prices) | {by_hand:,.0f} |\n"
        f"| `crypto_client_sdk.Client.prices()` (typed `Price` objects) | {sdk:,.0f} |\n"
        f"\nSDK / httpx loop: {ratio:.1%} (goal: at least {GOAL:.0%}: "
        f"{'met' if ratio >= GOAL else 'missed'}). Machine: {machine}, Python {platform.python_version()}."
    )


if __name__ == "__main__":
    main()
