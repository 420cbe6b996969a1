"""Benchmark the service against the seed's naive design on one fresh PostgreSQL database.

    uv run python -m bench            # the full run: 10 million rows, writes bench/RESULTS.md
    uv run python -m bench --smoke    # seconds, small data: checks that the benchmark still works

See bench/README.md.
"""

import argparse
import asyncio
import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import psutil
from sqlalchemy.engine import make_url

from bench.dashboard import dashboard_load
from bench.load import WRK_INSTALL, Load, load
from bench.storage import drop_under_load, postgres_bytes_per_row, sqlite_bytes_per_row
from bench.stream import stream_scenarios
from crypto_client.api.pagination import encode_cursor
from crypto_client.config import Settings
from crypto_client.db import migrations
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice
from crypto_client.ingestion.runtime import IngestionRuntime, open_runtime
from crypto_client.sim.prices import INDEXES, SYNTHETIC_INDEXES
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import ApiServer, SimServer, free_port

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BASE_TS = 1_699_999_980  # a whole minute
STEP = 60


@dataclass
class Plan:
    tickers: int
    rows_per_ticker: int
    seconds: float
    connections: int
    ingest_tickers: int
    smoke: bool

    @property
    def names(self) -> list[str]:
        return list(INDEXES)[: self.tickers]

    @property
    def depth(self) -> int:
        return min(400_000, int(self.rows_per_ticker * 0.8))


@dataclass
class Results:
    rows: list[tuple[str, Load, Load | None]] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    targets: list[tuple[str, bool, str]] = field(default_factory=list)
    bytes_per_row: dict[str, float] = field(default_factory=dict)

    def load(self, name: str) -> Load:
        return next(ours for label, ours, _ in self.rows if label == name)

    def baseline(self, name: str) -> Load:
        base = next(base for label, _, base in self.rows if label == name)
        assert base is not None
        return base


# --- processes and the database ------------------------------------------------------------


@contextmanager
def server(args: list[str], env: dict[str, str], port: int, log_name: str) -> Iterator[psutil.Process]:
    with ApiServer(args, env, WORK / log_name, port=port) as api:
        yield psutil.Process(api.process.popen.pid)


@contextmanager
def peak_rss(process: psutil.Process) -> Iterator[list[float]]:
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            # The server's own process and its workers (granian serves from a child process).
            family = [process, *process.children(recursive=True)]
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], sum(each.memory_info().rss for each in family) / 2**20)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


async def load_history(connection: asyncpg.Connection, names: list[str], rows_per_ticker: int) -> None:
    """`rows_per_ticker` one-minute rows of each index from BASE_TS on, each tracked from its
    first slot, into a database at revision 0004 (before partitioning)."""
    # Bulk load without the indexes, then build them once: minutes become seconds.
    await connection.execute("ALTER TABLE price_ticks DROP CONSTRAINT pk_price_ticks")
    await connection.execute("DROP INDEX ix_price_ticks_ticker_slot_ts")
    await connection.execute(
        """
        INSERT INTO price_ticks (ticker, ts, price, slot_ts)
        SELECT names.ticker, $1::bigint + i * $2, round((names.base * (1 + 0.05 * sin(i / 997.0)))::numeric,
               names.decimals), $1::bigint + i * $2
        FROM unnest($3::text[], $4::numeric[], $5::int[]) AS names(ticker, base, decimals),
             generate_series(0, $6::int - 1) AS i
        """,
        BASE_TS,
        STEP,
        names,
        [Decimal(INDEXES[name][0]) for name in names],
        [INDEXES[name][1] for name in names],
        rows_per_ticker,
    )
    await connection.execute("ALTER TABLE price_ticks ADD CONSTRAINT pk_price_ticks PRIMARY KEY (ticker, ts)")
    await connection.execute(
        "CREATE UNIQUE INDEX ix_price_ticks_ticker_slot_ts ON price_ticks (ticker, slot_ts)"
    )
    # Every ticker tracked from its first slot, as ingestion would have recorded it.
    await connection.execute(
        "INSERT INTO tracked_tickers (ticker, since_slot_ts) SELECT unnest($1::text[]), $2::bigint",
        names,
        BASE_TS,
    )
    await connection.execute("VACUUM ANALYZE price_ticks")


async def create_database(plan: Plan, results: Results) -> str:
    # Loaded at revision 0004, then migrated: the candle roll-up (0005) is built from the rows
    # as it would be on an existing installation.
    url = await create_pg_database(ADMIN_URL, prefix="cc_bench", migrate=False)
    await asyncio.to_thread(migrations.upgrade, url, "0004")
    connection = await asyncpg.connect(url)
    started = time.monotonic()
    await load_history(connection, plan.names, plan.rows_per_ticker)
    rows = await connection.fetchval("SELECT count(*) FROM price_ticks")
    print(f"loaded {rows:,} rows in {time.monotonic() - started:.1f}s into {make_url(url).database}")
    started = time.monotonic()
    await asyncio.to_thread(migrations.upgrade, url)
    await connection.execute("VACUUM ANALYZE price_candles_1h")
    results.extra[f"Migration to head on {rows:,} rows (candle roll-up, then partitioning)"] = (
        f"{time.monotonic() - started:.1f} s"
    )
    results.bytes_per_row["PostgreSQL"] = await postgres_bytes_per_row(url)
    results.bytes_per_row["SQLite"] = await sqlite_bytes_per_row()
    await connection.close()
    return url


# --- scenarios -----------------------------------------------------------------------------


def http_scenarios(plan: Plan, url: str, results: Results) -> None:
    ours_port, base_port = free_port(), free_port()
    # A long statement timeout: the deep-offset pages measure a slow path, not the guard.
    ours_env = {
        "DATABASE_URL": url,
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
        "API_STATEMENT_TIMEOUT_SECONDS": "60",
    }
    base_env = {
        "BASELINE_DATABASE_URL": make_url(url).set(drivername="postgresql+psycopg2").render_as_string(False)
    }
    ours_cmd = [sys.executable, "-m", "bench.server", str(ours_port), "granian"]
    base_cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.baseline.app:app",
        "--port",
        str(base_port),
        "--no-access-log",
    ]
    ticker = plan.names[0]
    middle = BASE_TS + (plan.rows_per_ticker // 2) * STEP
    day = min(1440, plan.rows_per_ticker // 4)
    deep_ts = BASE_TS + (plan.depth - 1) * STEP
    q = f"ticker={ticker}"
    scenarios: list[tuple[str, str, str | None]] = [
        ("/prices/latest", f"/prices/latest?{q}", f"/prices/latest?{q}"),
        ("/prices limit=1000, first page", f"/prices?{q}&limit=1000", f"/prices?{q}&limit=1000"),
        (
            f"/prices limit=1000, offset={plan.depth:,}",
            f"/prices?{q}&limit=1000&offset={plan.depth}",
            f"/prices?{q}&limit=1000&offset={plan.depth}",
        ),
        (
            f"/prices limit=1000, cursor at {plan.depth:,}",
            f"/prices?{q}&limit=1000&cursor={encode_cursor(deep_ts)}",
            None,
        ),
        (
            f"/prices/range {day} rows, start",
            f"/prices/range?{q}&from_ts={BASE_TS}&to_ts={BASE_TS + day * STEP - 1}&limit={day}",
            f"/prices/range?{q}&from_ts={BASE_TS}&to_ts={BASE_TS + day * STEP - 1}",
        ),
        (
            f"/prices/range {day} rows, middle",
            f"/prices/range?{q}&from_ts={middle}&to_ts={middle + day * STEP - 1}&limit={day}",
            f"/prices/range?{q}&from_ts={middle}&to_ts={middle + day * STEP - 1}",
        ),
        (
            f"/coverage, one ticker's whole history ({plan.rows_per_ticker:,} slots)",
            f"/coverage?{q}&from_ts={BASE_TS}&to_ts={BASE_TS + plan.rows_per_ticker * STEP - 1}",
            None,
        ),
        ("framework ceiling (no database)", "/bench/ping", None),
    ]
    with (
        server(ours_cmd, ours_env, ours_port, "ours.log") as ours,
        server(base_cmd, base_env, base_port, "baseline.log"),
    ):
        for label, ours_path, base_path in scenarios:
            for port, path in ((ours_port, ours_path), (base_port, base_path)):
                if path is not None:
                    httpx.get(f"http://127.0.0.1:{port}{path}", timeout=30).raise_for_status()  # warm up
            with peak_rss(ours) as peak:
                ours_load = load(f"http://127.0.0.1:{ours_port}{ours_path}", plan.seconds, plan.connections)
            results.rss_mb[label] = peak[0]
            base_load = (
                load(f"http://127.0.0.1:{base_port}{base_path}", plan.seconds, plan.connections)
                if base_path
                else None
            )
            results.rows.append((label, ours_load, base_load))
            print(
                f"{label}: {ours_load.rps:,.0f} req/s"
                + (f" vs baseline {base_load.rps:,.0f}" if base_load else "")
            )

        with peak_rss(ours) as peak:
            walked, pages, started = 0, 0, time.monotonic()
            next_url: str | None = f"http://127.0.0.1:{ours_port}/prices?{q}&limit=10000"
            with httpx.Client(timeout=60) as client:
                while next_url:
                    response = client.get(next_url)
                    walked += len(response.json())
                    pages += 1
                    link = response.links.get("next", {}).get("url")
                    next_url = f"http://127.0.0.1:{ours_port}{link}" if link else None
        assert walked == plan.rows_per_ticker, walked
        results.rss_mb["full-history walk"] = peak[0]
        results.extra["Full-history walk of one ticker (cursor pages of 10,000)"] = (
            f"{walked:,} rows in {pages} pages, {time.monotonic() - started:.2f} s"
        )
        coverage_path = f"/coverage?{q}&from_ts={BASE_TS}&to_ts={BASE_TS + plan.rows_per_ticker * STEP - 1}"
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            httpx.get(f"http://127.0.0.1:{ours_port}{coverage_path}", timeout=60).raise_for_status()
            timings.append((time.perf_counter() - started) * 1000)
        results.extra["/coverage of one ticker's whole history, one request at a time"] = (
            f"median {statistics.median(timings):.0f} ms over 5"
        )
        results.targets.append(
            (
                "/coverage of one ticker's whole history, unloaded, < 500 ms",
                statistics.median(timings) < 500,
                f"{statistics.median(timings):.0f} ms",
            )
        )
        abandoned_requests(plan, url, ours_port, f"/prices?{q}&limit=1000&offset={plan.depth}", results)
        query_power(plan, ours, ours_port, q, results)
        dashboard_load(f"http://127.0.0.1:{ours_port}", results.extra, results.targets)
        dropped_rows = 20_000 if plan.smoke else 1_000_000
        quiet, busy, took = drop_under_load(
            url,
            f"http://127.0.0.1:{ours_port}/prices/latest?{q}",
            plan.seconds,
            plan.connections,
            dropped_rows,
        )
        results.extra[f"/prices/latest while a month's partition of {dropped_rows:,} rows is dropped"] = (
            f"p99 {busy.p99_ms:.1f} ms (without: {quiet.p99_ms:.1f} ms); the drop took {took * 1000:.0f} ms"
        )
        results.targets.append(
            (
                "/prices/latest p99 within 2x while a partition is dropped",
                busy.p99_ms <= 2 * quiet.p99_ms,
                f"{busy.p99_ms / quiet.p99_ms:.2f}x",
            )
        )

    # As-of lookups against the latest price with its cache off, one request at a time (under
    # concurrency the latest price's single flight would merge requests, /prices/at's not).
    uncached_port = free_port()
    uncached_cmd = [sys.executable, "-m", "bench.server", str(uncached_port), "granian"]
    with server(uncached_cmd, {**ours_env, "API_LATEST_CACHE_SECONDS": "0"}, uncached_port, "uncached.log"):
        middle_ts = BASE_TS + (plan.rows_per_ticker // 2) * STEP + 17
        base = f"http://127.0.0.1:{uncached_port}"
        latest_ms = one_at_a_time_ms(f"{base}/prices/latest?{q}", times=200)
        at_ms = one_at_a_time_ms(f"{base}/prices/at?{q}&ts={middle_ts}", times=200)
        results.extra["/prices/at (middle of the history) and /prices/latest (cache off), one at a time"] = (
            f"median {at_ms:.2f} ms and {latest_ms:.2f} ms over 200 each"
        )
        results.targets.append(
            (
                "/prices/at within 1.2x of uncached /prices/latest",
                at_ms <= 1.2 * latest_ms,
                f"{at_ms / latest_ms:.2f}x",
            )
        )

    # The other server candidate, side by side on the two scenarios that measure the stack.
    candidate_port = free_port()
    candidate_cmd = [sys.executable, "-m", "bench.server", str(candidate_port), "uvicorn"]
    with server(candidate_cmd, ours_env, candidate_port, "uvicorn.log"):
        for label, path in (
            ("/prices/latest", f"/prices/latest?{q}"),
            ("framework ceiling (no database)", "/bench/ping"),
        ):
            httpx.get(f"http://127.0.0.1:{candidate_port}{path}", timeout=30).raise_for_status()
            candidate = load(f"http://127.0.0.1:{candidate_port}{path}", plan.seconds, plan.connections)
            results.rows.append((f"{label} [uvicorn]", candidate, None))
            print(f"{label} [uvicorn]: {candidate.rps:,.0f} req/s, p99 {candidate.p99_ms:.1f} ms")


def one_at_a_time_ms(url: str, times: int = 5) -> float:
    timings = []
    for _ in range(times):
        started = time.perf_counter()
        httpx.get(url, timeout=120).raise_for_status()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def query_power(plan: Plan, process: psutil.Process, port: int, q: str, results: Results) -> None:
    """Candles over a ticker's whole history, the first page of hourly ones, and a whole
    history exported as CSV (rows/s and the server's memory meanwhile)."""
    base = f"http://127.0.0.1:{port}"
    daily = one_at_a_time_ms(f"{base}/prices/candles?{q}&interval=1d&limit=10000")
    hourly = one_at_a_time_ms(f"{base}/prices/candles?{q}&interval=1h&limit=1000")
    results.extra[
        f"1d candles of one ticker's whole history ({plan.rows_per_ticker:,} rows), one at a time"
    ] = f"median {daily:.0f} ms"
    results.extra["1h candles, first page (1,000 candles), one at a time"] = f"median {hourly:.0f} ms"
    results.targets.append(("1d candles of the whole history < 300 ms", daily < 300, f"{daily:.0f} ms"))
    results.targets.append(("1h candles, first page < 100 ms", hourly < 100, f"{hourly:.0f} ms"))
    with peak_rss(process) as peak, httpx.Client(timeout=300) as client:
        started = time.perf_counter()
        lines = 0
        with client.stream("GET", f"{base}/prices/export?{q}&format=csv") as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                lines += chunk.count(b"\n")
        elapsed = time.perf_counter() - started
    rows = lines - 1  # the header
    assert rows == plan.rows_per_ticker, rows
    rate = rows / elapsed
    results.extra[f"CSV export of one ticker's whole history ({rows:,} rows)"] = (
        f"{rate:,.0f} rows/s, {elapsed:.2f} s; server RSS at most {peak[0]:.0f} MB"
    )
    results.targets.append(("CSV export >= 300,000 rows/s", rate >= 300_000, f"{rate:,.0f} rows/s"))
    results.targets.append(("API RSS < 200 MB during the export", peak[0] < 200, f"{peak[0]:.0f} MB"))


def abandoned_requests(plan: Plan, url: str, port: int, heavy_path: str, results: Results) -> None:
    """200 heavy requests whose clients give up after 0.5 s, then one light request: it must
    not wait behind them, and none of their queries may still run a second later."""
    count = 200 if not plan.smoke else 20

    async def run() -> tuple[float, int]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=0.5) as impatient:
            await asyncio.gather(*(impatient.get(heavy_path) for _ in range(count)), return_exceptions=True)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            started = time.perf_counter()
            (await client.get(f"/prices?ticker={plan.names[1]}&limit=1")).raise_for_status()
            light_ms = (time.perf_counter() - started) * 1000
        await asyncio.sleep(1)
        connection = await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(False))
        try:
            running: int = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'crypto-client-api'"
                " AND state = 'active' AND datname = current_database()"
            )
        finally:
            await connection.close()
        return light_ms, running

    light_ms, running = asyncio.run(run())
    results.extra[f"{count} abandoned heavy requests (client timeout 0.5 s), then a light one"] = (
        f"light request {light_ms:.1f} ms; API queries still running 1 s later: {running}"
    )
    results.targets.append(
        ("light request after abandoned ones < 100 ms", light_ms < 100, f"{light_ms:.1f} ms")
    )
    results.targets.append(("no abandoned query running 1 s later", running == 0, str(running)))


def pgbench_ceiling(plan: Plan, url: str, results: Results) -> None:
    if not shutil.which("pgbench"):
        results.extra["pgbench (latest-price SQL)"] = "pgbench not installed"
        return
    script = WORK / "latest.sql"
    # The query /prices/latest sends; the ticker is one of our own index names, not input.
    where = f"WHERE ticker = '{plan.names[0]}'"
    script.write_text(f"SELECT ticker, price, ts FROM price_ticks {where} ORDER BY ts DESC LIMIT 1;\n")  # noqa: S608
    target = make_url(url)
    output = subprocess.run(
        [
            "pgbench",
            "-n",
            "-c",
            str(plan.connections),
            "-j",
            "2",
            "-T",
            str(max(1, round(plan.seconds))),
            "-f",
            str(script),
            "-h",
            target.host or "127.0.0.1",
            "-p",
            str(target.port or 5432),
            "-U",
            target.username or "postgres",
            target.database or "",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tps = re.search(r"tps = ([\d.]+)", output)
    latency = re.search(r"latency average = ([\d.]+) ms", output)
    results.extra["pgbench, latest-price SQL (database ceiling)"] = (
        f"{float(tps.group(1)) if tps else 0:,.0f} queries/s, mean {latency.group(1) if latency else '?'} ms"
        f" at {plan.connections} clients"
    )


def ingest_settings(tickers: list[str], sim: SimServer, url: str) -> Settings:
    return Settings.model_validate(
        {
            "tickers": tickers,
            "deribit_rpc_url": sim.rpc_url,
            "database_url": url,
            "ingest_interval_seconds": 1,
        }
    )


async def tick_durations(runtime: IngestionRuntime, ticks: int = 5) -> list[float]:
    durations = []
    for _ in range(ticks):
        summary = await runtime.run_tick(slot_ts=None)
        assert summary.ok, summary
        durations.append(summary.duration_seconds)
        await asyncio.sleep(1.05)  # a new second: new rows, not duplicates
    return durations


async def ingestion_scenarios(plan: Plan, url: str, results: Results) -> None:
    sim = SimServer(WORK)
    tickers = list(INDEXES)[: plan.ingest_tickers]
    try:
        sim.faults(latency_ms=100)
        settings = ingest_settings(tickers, sim, url)
        async with open_runtime(settings) as runtime:
            durations = await tick_durations(runtime)
            results.extra[f"Ingestion tick, {len(tickers)} tickers at 100 ms latency"] = (
                f"median {statistics.median(durations):.3f} s, worst {max(durations):.3f} s"
                f" (DERIBIT_MAX_CONCURRENCY={settings.deribit_max_concurrency})"
            )
            median = statistics.median(durations)
            results.targets.append(("ingestion tick of 50 tickers < 0.5 s", median < 0.5, f"{median:.3f} s"))

            started = time.monotonic()
            with httpx.Client() as naive:
                for ticker in tickers:
                    response = naive.get(
                        f"{sim.rpc_url}/public/get_index_price", params={"index_name": ticker}
                    )
                    response.raise_for_status()
            results.extra[f"Naive sequential fetch of the same {len(tickers)} tickers"] = (
                f"{time.monotonic() - started:.3f} s"
            )

            await worker_capacity(plan, sim, url, results)

            count = 100_000 if not plan.smoke else 5_000
            batch = [NewPrice("bulk_usd", Decimal("43521.37"), BASE_TS + i) for i in range(count)]
            started = time.monotonic()
            async with runtime.engine.begin() as connection:
                inserted = await PriceWriter(connection).insert_many(batch)
            assert len(inserted) == count
            elapsed = time.monotonic() - started
            results.extra["Bulk insert (insert_many, one transaction)"] = (
                f"{count / elapsed:,.0f} rows/s ({count:,} rows)"
            )
    finally:
        sim.stop()


async def worker_capacity(plan: Plan, sim: SimServer, url: str, results: Results) -> None:
    """How many tickers one ingestion process sustains: ticks of many tickers at a realistic
    Deribit round trip, and what fits in 80% of a 1 s and a 60 s slot at that pace."""
    tickers = list(SYNTHETIC_INDEXES)[: 40 if plan.smoke else 200]
    sim.faults(latency_ms=50)
    async with open_runtime(ingest_settings(tickers, sim, url)) as runtime:
        durations = await tick_durations(runtime)
    median = statistics.median(durations)
    per_second = len(tickers) / median
    results.extra[f"Ingestion tick, {len(tickers)} tickers at 50 ms latency (one process)"] = (
        f"median {median:.3f} s: about {per_second:,.0f} tickers/s, so one worker process sustains about"
        f" {int(0.8 * per_second):,} tickers at 1 s slots and {int(0.8 * 60 * per_second):,} at 60 s"
        " (Deribit's rate limits come first)"
    )


# --- report --------------------------------------------------------------------------------


def judge(results: Results, plan: Plan) -> None:
    def ratio(label: str) -> float:
        return results.load(label).rps / results.baseline(label).rps

    latest = "/prices/latest"
    first = "/prices limit=1000, first page"
    cursor = f"/prices limit=1000, cursor at {plan.depth:,}"
    day = min(1440, plan.rows_per_ticker // 4)
    start, middle = f"/prices/range {day} rows, start", f"/prices/range {day} rows, middle"
    ceiling = results.load("framework ceiling (no database)").rps
    results.targets += [
        ("/prices/latest >= 10x baseline", ratio(latest) >= 10, f"{ratio(latest):.1f}x"),
        (
            "/prices/latest >= 90% of framework ceiling (same server)",
            results.load(latest).rps >= 0.9 * ceiling,
            f"{results.load(latest).rps / ceiling:.0%}",
        ),
        (
            "/prices/latest p99 < 50 ms",
            results.load(latest).p99_ms < 50,
            f"{results.load(latest).p99_ms:.1f} ms",
        ),
        (
            "/prices/latest p99.9 < 100 ms",
            results.load(latest).p999_ms < 100,
            f"{results.load(latest).p999_ms:.1f} ms",
        ),
        ("/prices limit=1000 >= 10x baseline", ratio(first) >= 10, f"{ratio(first):.1f}x"),
        (
            "deep cursor page p50 <= 2x first page p50",
            results.load(cursor).p50_ms <= 2 * results.load(first).p50_ms,
            f"{results.load(cursor).p50_ms / results.load(first).p50_ms:.2f}x",
        ),
        ("one-day range >= 10x baseline", ratio(middle) >= 10, f"{ratio(middle):.1f}x"),
        (
            "one-day range p50, middle <= 1.5x start",
            results.load(middle).p50_ms <= 1.5 * results.load(start).p50_ms,
            f"{results.load(middle).p50_ms / results.load(start).p50_ms:.2f}x",
        ),
        (
            "API RSS < 200 MB in every scenario",
            max(results.rss_mb.values()) < 200,
            f"{max(results.rss_mb.values()):.0f} MB",
        ),
    ]


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = psutil.virtual_memory().total / 2**30
    postgres = "PostgreSQL client not installed"
    if shutil.which("psql"):
        postgres = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {postgres}"
    )


CAPACITY_CASES = ((20, 60), (200, 60), (20, 1), (200, 1))


def capacity_table(bytes_per_row: dict[str, float]) -> list[str]:
    """Disk for N tickers at interval I, from the measured bytes per row (rows, indexes, and
    on PostgreSQL the candle roll-up; before any VACUUM FULL)."""
    backends = sorted(bytes_per_row)
    lines = [
        "",
        "Bytes per stored row: "
        + ", ".join(f"{name} {bytes_per_row[name]:.0f}" for name in backends)
        + ". Capacity from them (PostgreSQL: one partition a month, 12 a year):",
        "",
        "| Tickers | Interval | Rows a day | "
        + " | ".join(f"{name} a day | {name} a year" for name in backends)
        + " |",
        "| ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in backends) + " |",
    ]
    for tickers, interval in CAPACITY_CASES:
        per_day = tickers * 86_400 // interval
        daily = {name: per_day * bytes_per_row[name] / 2**20 for name in backends}
        cells = " | ".join(
            f"{daily[name]:,.0f} MiB | {daily[name] * 365 / 2**10:,.1f} GiB" for name in backends
        )
        lines.append(f"| {tickers} | {interval} s | {per_day:,} | {cells} |")
    return lines


def report(results: Results, plan: Plan, loader: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `uv run python -m bench`"
        + (" --smoke" if plan.smoke else ""),
        f"- Machine: {machine()}",
        f"- Data: {plan.tickers} tickers x {plan.rows_per_ticker:,} one-minute ticks"
        f" = {plan.tickers * plan.rows_per_ticker:,} rows in PostgreSQL",
        f"- Load: {loader}, {plan.connections} connections, {plan.seconds:g} s per scenario; both servers are"
        " one process on the same machine as the load generator and PostgreSQL: the service on granian (its"
        " server), the `[uvicorn]` rows the same app on uvicorn with httptools and uvloop, the baseline on"
        " uvicorn",
        "- Baseline: `bench/baseline/app.py`, the seed's design (sync endpoints, ORM session per request over"
        " psycopg2, a Pydantic model per row, OFFSET paging, whole ranges)",
        "",
        "| Scenario | req/s | p50 ms | p99 ms | p99.9 ms | baseline req/s | baseline p50 ms | baseline p99 ms"
        " | ratio | API peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, ours, base in results.rows:
        base_cells = (
            f"{base.rps:,.0f} | {base.p50_ms:.2f} | {base.p99_ms:.2f} | {ours.rps / base.rps:.1f}x"
            if base
            else "— | — | — | —"
        )
        lines.append(
            f"| {label} | {ours.rps:,.0f} | {ours.p50_ms:.2f} | {ours.p99_ms:.2f} | {ours.p999_ms:.2f} |"
            f" {base_cells} |"
            f" {results.rss_mb.get(label, 0):.0f} |"
        )
    errors = sum(o.non_2xx + o.errors for _, o, _ in results.rows)
    lines += ["", f"Non-2xx responses and socket errors of the service, all scenarios: {errors}.", ""]
    lines += ["| Measure | Result |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in results.extra.items()]
    lines.append(f"| API peak RSS, full-history walk | {results.rss_mb.get('full-history walk', 0):.0f} MB |")
    lines += capacity_table(results.bytes_per_row)
    lines += ["", "| Target | Met | Measured |", "| --- | --- | --- |"]
    lines += [f"| {name} | {'yes' if met else 'NO'} | {value} |" for name, met, value in results.targets]
    ceiling = results.load("framework ceiling (no database)")
    latest_baseline = results.baseline("/prices/latest")
    if ceiling.rps < 10 * latest_baseline.rps:
        lines += [
            "",
            f"The framework ceiling (an endpoint that does nothing, on the same server) is only"
            f" {ceiling.rps / latest_baseline.rps:.1f}x the baseline's `/prices/latest`, so no endpoint of"
            " this server can reach 10x it on this machine; `/prices/latest` gets"
            f" {results.load('/prices/latest').rps / ceiling.rps:.0%} of that ceiling.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small data, short runs (CI)")
    parser.add_argument("--seconds", type=float, help="load duration per scenario")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = parser.parse_args()
    plan = (
        Plan(
            tickers=3,
            rows_per_ticker=5_000,
            seconds=args.seconds or 1,
            connections=4,
            ingest_tickers=10,
            smoke=True,
        )
        if args.smoke
        else Plan(20, 500_000, args.seconds or 10, args.connections, ingest_tickers=50, smoke=False)
    )
    if not shutil.which("wrk"):
        if not plan.smoke:
            sys.exit(f"wrk is required for the full benchmark: {WRK_INSTALL}")
        print(f"wrk not found, using the built-in Python load generator ({WRK_INSTALL})")
    loader = "wrk" if shutil.which("wrk") else "Python load generator"
    WORK.mkdir(exist_ok=True)

    results = Results()
    url = asyncio.run(create_database(plan, results))
    try:
        http_scenarios(plan, url, results)
        pgbench_ceiling(plan, url, results)
        asyncio.run(ingestion_scenarios(plan, url, results))
        stream_scenarios(
            url,
            WORK,
            tickers=3 if plan.smoke else 20,
            clients=5 if plan.smoke else 100,
            wide_tickers=20 if plan.smoke else 200,
            seconds=3 if plan.smoke else 30,
            extra=results.extra,
            targets=results.targets,
        )
    finally:
        if not args.keep:
            asyncio.run(drop_pg_database(url, ADMIN_URL))
    judge(results, plan)
    text = report(results, plan, loader)
    target = WORK / "RESULTS-smoke.md" if plan.smoke else HERE / "RESULTS.md"
    target.write_text(text)
    print(text)
    print(f"written to {target}")
    failures = sum(o.non_2xx + o.errors for _, o, _ in results.rows)
    if failures:
        sys.exit(f"{failures} failed requests")


if __name__ == "__main__":
    main()
