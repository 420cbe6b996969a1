"""/prices/latest with API keys and quotas on, against off, in the same run (issue 27's goal:
within 10 %).

    uv run python -m bench.exposure       # about a minute; prints a table for docs/notes

Both servers read one PostgreSQL database; "on" checks a key on every request and charges it
to a quota counted in Redis (a throwaway redis-server), with a limit no run reaches. The two
are measured in alternating rounds, so that a neighbour's load falls on both alike.
"""

import asyncio
import os
import platform
import statistics
import time
from decimal import Decimal

from bench.common import WORK, server
from bench.load import Load, load
from crypto_client.api.auth import generate_key, key_digest
from crypto_client.db import api_keys
from crypto_client.db.engine import create_engine
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import ThrowawayRedis, crypto_client, free_port

ROUNDS = 3
SECONDS = 8
CONNECTIONS = 64
PATH = "/prices/latest?ticker=btc_usd"


async def seed(url: str) -> str:
    engine = create_engine(url)
    key = generate_key()
    try:
        async with engine.begin() as connection:
            now = int(time.time()) // 60 * 60
            rows = [NewPrice("btc_usd", Decimal("43521.5"), ts, ts) for ts in range(now - 86_400, now, 60)]
            await PriceWriter(connection).insert_many(rows)
            await api_keys.create_key(connection, "bench", key_digest(key), None, now)
    finally:
        await engine.dispose()
    return key


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    WORK.mkdir(exist_ok=True)
    url = asyncio.run(create_pg_database())
    redis = ThrowawayRedis()
    try:
        key = asyncio.run(seed(url))
        base = {"DATABASE_URL": url, "TICKERS": "btc_usd", "LOG_LEVEL": "WARNING"}
        guarded = {
            **base,
            "API_KEYS_REQUIRED": "true",
            "API_RATE_LIMIT": "100000/second",
            "API_RATE_LIMIT_STORAGE_URL": redis.url,
        }
        off_port, on_port = free_port(), free_port()
        results: dict[str, list[Load]] = {"off": [], "on": []}
        command = ["api", "--port"]
        with (
            server(crypto_client(*command, str(off_port)), base, off_port, "exposure-off.log"),
            server(crypto_client(*command, str(on_port)), guarded, on_port, "exposure-on.log"),
        ):
            headers = {"Authorization": f"Bearer {key}"}
            load(f"http://127.0.0.1:{off_port}{PATH}", 2, CONNECTIONS)  # warm-up
            load(f"http://127.0.0.1:{on_port}{PATH}", 2, CONNECTIONS, headers)
            for _ in range(ROUNDS):
                results["off"].append(load(f"http://127.0.0.1:{off_port}{PATH}", SECONDS, CONNECTIONS))
                results["on"].append(load(f"http://127.0.0.1:{on_port}{PATH}", SECONDS, CONNECTIONS, headers))
    finally:
        redis.stop()
        asyncio.run(drop_pg_database(url))

    print(
        f"machine: {os.cpu_count()} CPUs, {_cpu_model()}; {CONNECTIONS} connections, {ROUNDS} x {SECONDS} s"
    )
    print("| /prices/latest | req/s (median) | p50 ms | p99 ms | non-2xx |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, loads in results.items():
        rps = statistics.median(each.rps for each in loads)
        p50 = statistics.median(each.p50_ms for each in loads)
        p99 = statistics.median(each.p99_ms for each in loads)
        summary[name] = (rps, p99)
        failed = sum(each.non_2xx + each.errors for each in loads)
        label = "keys + quotas on" if name == "on" else "off"
        print(f"| {label} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {failed} |")
    ratio = summary["on"][0] / summary["off"][0]
    print(f"throughput on/off: {ratio:.1%}; p99 on/off: {summary['on'][1] / summary['off'][1]:.2f}x")


if __name__ == "__main__":
    main()
