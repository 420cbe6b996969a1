"""Benchmark the service against the seed's naive design on one fresh PostgreSQL database.

    uv run python -m bench            # the full run: 10 million rows, writes bench/RESULTS.md
    uv run python -m bench --smoke    # seconds, small data: checks that the benchmark still works

See bench/README.md.
"""

import argparse
import asyncio
import shutil
import sys

from bench.common import ADMIN_URL, HERE, WORK, Plan, Results
from bench.database import create_database, pgbench_ceiling
from bench.http_api import http_scenarios
from bench.ingestion import ingestion_scenarios
from bench.load import WRK_INSTALL
from bench.report import judge, report
from bench.stream import stream_scenarios
from tests.support.databases import drop_pg_database


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
            seconds=args.seconds or 0.5,
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
