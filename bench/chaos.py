"""The long chaos run: the harness of `tests/chaos/` for many minutes per seed, both backends,
printing the summary tables that go into bench/RESULTS.md.

    uv run python -m bench.chaos --minutes 30 --seed 1 --seed 2
    uv run python -m bench.chaos --minutes 3 --seed 22 --backend postgresql

Each run starts its own simulator, throwaway PostgreSQL and Redis (or a SQLite file), so it
needs nothing running but the installed binaries. The exit status is 1 when the checker found
anything; the findings follow each table.
"""

import argparse
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from tests.chaos.harness import execute, postgres_run, sqlite_run

QUIET_SECONDS = 30  # after the faults: the repair's time to fill what it can


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="Minutes of faults per run.")
    parser.add_argument("--seed", type=int, action="append", help="A seed (repeatable; default 1).")
    parser.add_argument("--backend", choices=("postgresql", "sqlite", "both"), default="both")
    parser.add_argument("--out", type=Path, help="Also append the tables to this file.")
    args = parser.parse_args()
    backends = ("postgresql", "sqlite") if args.backend == "both" else (args.backend,)
    failed = False
    for seed in args.seed or [1]:
        for backend in backends:
            started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            tmp = Path(tempfile.mkdtemp(prefix=f"chaos-{backend}-{seed}-"))
            runner = postgres_run if backend == "postgresql" else sqlite_run
            with runner(tmp, seed) as run:
                summary = execute(run, fault_seconds=args.minutes * 60, quiet_seconds=QUIET_SECONDS)
            command = (
                f"`uv run python -m bench.chaos --minutes {args.minutes:g} --seed {seed} --backend {backend}`"
            )
            text = [f"- Run: {started}, {command}", "", summary.table(), ""]
            text += [f"- finding: {finding.line()}" for finding in summary.report.findings[:50]]
            text += [f"- note: {note}" for note in summary.report.notes]
            if summary.report.ok:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                text.append(f"- the processes' logs are kept in {tmp}")
            print("\n".join(text), flush=True)
            if args.out is not None:
                with args.out.open("a") as out:
                    out.write("\n".join(text) + "\n\n")
            failed = failed or not summary.report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
