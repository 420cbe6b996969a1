"""The HTTP scenarios: the service and the baseline under the same load, then the service's
own measures (full-history walk, coverage, candles, abandoned requests, as-of lookups)."""

import asyncio
import sys
import time

import asyncpg
import httpx
import psutil
from sqlalchemy.engine import make_url

from bench.common import BASE_TS, STEP, Plan, Results, one_at_a_time_ms, peak_rss, server
from bench.dashboard import dashboard_load
from bench.load import load
from bench.storage import drop_under_load
from crypto_client.api.pagination import encode_cursor
from tests.support.services import free_port


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
        coverage_ms = one_at_a_time_ms(f"http://127.0.0.1:{ours_port}{coverage_path}", times=5)
        results.extra["/coverage of one ticker's whole history, one request at a time"] = (
            f"median {coverage_ms:.0f} ms over 5"
        )
        results.targets.append(
            (
                "/coverage of one ticker's whole history, unloaded, < 500 ms",
                coverage_ms < 500,
                f"{coverage_ms:.0f} ms",
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
        times = 40 if plan.smoke else 200
        latest_ms = one_at_a_time_ms(f"{base}/prices/latest?{q}", times=times)
        at_ms = one_at_a_time_ms(f"{base}/prices/at?{q}&ts={middle_ts}", times=times)
        results.extra["/prices/at (middle of the history) and /prices/latest (cache off), one at a time"] = (
            f"median {at_ms:.2f} ms and {latest_ms:.2f} ms over {times} each"
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
