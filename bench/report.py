"""The report: targets judged from the results, the machine, capacity, bench/RESULTS.md's text."""

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import psutil

from bench.common import Plan, Results


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
