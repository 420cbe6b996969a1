"""/prices/latest with API keys and quotas on, against off, in the same run (issue 27's goal:
within 10 % in throughput and in p99).

    uv run python -m bench.exposure                 # about 4 minutes; prints a table for RESULTS.md
    uv run python -m bench.exposure --rounds 6 --seconds 2

Three servers run side by side on one PostgreSQL database: "off", a twin of it, and "on", which
checks a key on every request and charges it to a quota counted in Redis (a throwaway
redis-server), with a limit no run reaches. A shared machine's load comes and goes, so they are
measured in many short rounds, each server once per round, in an order that goes through every
permutation (a neighbour's burst falls on all alike, and none always goes first). The table gives
the medians over the rounds, and the median of each round's ratio to "off": the twin's is the
noise floor of this machine in this run, the one on's is compared with the goal. Throughput
and latency move with the neighbours' load; the server's CPU time per request (its process and
its worker, user + system) moves far less, and says what the guard costs where the machine is
not shared.
"""

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import psutil

from bench.common import WORK, server
from bench.load import Load, load
from crypto_client.api.auth import generate_key, key_digest
from crypto_client.db import api_keys
from crypto_client.db.engine import create_engine
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import ThrowawayRedis, crypto_client, free_port

CONNECTIONS = 64
PATH = "/prices/latest?ticker=btc_usd"
GOAL = 0.10  # on may be at most 10 % slower (throughput) and 10 % higher (p99) than off


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


# The servers measured: the same "off" server twice over (its twin shows the noise floor of this
# machine in this run), and "on".
SERVERS = ("off", "off, twin", "on")


@dataclass(frozen=True)
class Run:
    load: Load
    cpu_us: float  # the server's CPU time per request served, in microseconds

    @property
    def rps(self) -> float:
        return self.load.rps

    @property
    def p99_ms(self) -> float:
        return self.load.p99_ms


def _cpu_seconds(process: psutil.Process) -> float:
    """User and system time of `process` and its children (granian serves from a worker)."""
    return sum(sum(each.cpu_times()[:2]) for each in [process, *process.children(recursive=True)])


def _run(process: psutil.Process, target: str, seconds: float, headers: dict[str, str]) -> Run:
    cpu_before = _cpu_seconds(process)
    measured = load(target, seconds, CONNECTIONS, headers)
    cpu = _cpu_seconds(process) - cpu_before
    return Run(measured, cpu / (measured.rps * seconds) * 1e6)


def measure(rounds: int, seconds: float) -> dict[str, list[Run]]:
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
        ports = {name: free_port() for name in SERVERS}
        headers = {"off": {}, "off, twin": {}, "on": {"Authorization": f"Bearer {key}"}}
        targets = {name: f"http://127.0.0.1:{port}{PATH}" for name, port in ports.items()}
        results: dict[str, list[Run]] = {name: [] for name in SERVERS}
        orders = list(itertools.permutations(SERVERS))  # each server in each place alike
        with contextlib.ExitStack() as servers:
            processes = {}
            for name, port in ports.items():
                env = guarded if name == "on" else base
                args = crypto_client("api", "--port", str(port))
                log_name = f"exposure-{name.replace(', ', '-')}.log"
                processes[name] = servers.enter_context(server(args, env, port, log_name))
            for name in SERVERS:  # warm-up: caches, pools, the key's lookup
                load(targets[name], 3, CONNECTIONS, headers[name])
            for round_ in range(rounds):
                for name in orders[round_ % len(orders)]:
                    results[name].append(_run(processes[name], targets[name], seconds, headers[name]))
    finally:
        redis.stop()
        asyncio.run(drop_pg_database(url))
    return results


def _median_ratio(results: dict[str, list[Run]], name: str, figure: Callable[[Run], float]) -> float:
    """The median over the rounds of `name`'s figure against "off"'s in the same round."""
    pairs = zip(results[name], results["off"], strict=True)
    return statistics.median(figure(each) / figure(off) for each, off in pairs)


FIGURES: dict[str, Callable[[Run], float]] = {
    "req/s": lambda run: run.rps,
    "p99": lambda run: run.p99_ms,
    "CPU/request": lambda run: run.cpu_us,
}


def report(results: dict[str, list[Run]], rounds: int, seconds: float, load_before: str) -> None:
    """Prints the Markdown table and whether the goal is met."""
    memory = psutil.virtual_memory().total / 2**30
    load_after = " ".join(f"{each:.1f}" for each in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), {memory:.0f} GiB; load average before "
        f"{load_before}, after {load_after}; wrk, {CONNECTIONS} connections, {rounds} rounds x "
        f"{seconds:g} s per server, interleaved"
    )
    print(
        "\n| /prices/latest | req/s | p50 ms | p99 ms | p99 range ms | server CPU µs/request | non-2xx "
        "| req/s / off | p99 / off | CPU / off |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        p99s = [each.p99_ms for each in runs]
        failed = sum(each.load.non_2xx + each.load.errors for each in runs)
        label = "keys + quotas on" if name == "on" else name
        ratios = [
            f"{_median_ratio(results, name, figure):.1%}" if name != "off" else ""
            for figure in FIGURES.values()
        ]
        print(
            f"| {label} | {statistics.median(each.rps for each in runs):,.0f} "
            f"| {statistics.median(each.load.p50_ms for each in runs):.2f} | {statistics.median(p99s):.2f} "
            f"| {min(p99s):.1f} to {max(p99s):.1f} | {statistics.median(each.cpu_us for each in runs):.0f} "
            f"| {failed} | {' | '.join(ratios)} |"
        )
    throughput = _median_ratio(results, "on", FIGURES["req/s"])
    p99 = _median_ratio(results, "on", FIGURES["p99"])
    met = throughput >= 1 - GOAL and p99 <= 1 + GOAL
    print(
        f"\nratios: the median over the rounds of each round's figure against off's; goal (on within "
        f"{GOAL:.0%} of off in req/s and p99): {'met' if met else 'missed'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=18)
    parser.add_argument("--seconds", type=float, default=3)
    options = parser.parse_args()
    load_before = " ".join(f"{each:.1f}" for each in os.getloadavg())
    results = measure(options.rounds, options.seconds)
    report(results, options.rounds, options.seconds, load_before)


if __name__ == "__main__":
    main()
