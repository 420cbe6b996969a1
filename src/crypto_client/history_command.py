"""`crypto-client backfill --since`: years of slots from Deribit's trade history, then the
chart for the recent day, with a progress bar on a terminal and a log line otherwise."""

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime

import structlog
import typer

from crypto_client.config import Settings
from crypto_client.domain import DAY_SECONDS
from crypto_client.ingestion.runtime import RECENT_REPAIR_SECONDS, open_runtime
from crypto_client.ingestion.trade_backfill import ProgressCallback, TradeBackfillReport

log = structlog.get_logger(__name__)

PROGRESS_LOG_SECONDS = 5.0


def parse_day(option: str, value: str) -> int:
    """A `YYYY-MM-DD` option as the UNIX time of that UTC day's start, or exit 2 saying why."""
    try:
        return int(datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC).timestamp())
    except ValueError:
        typer.echo(f"crypto-client: {option}: {value!r} is not a date (YYYY-MM-DD)", err=True)
        raise typer.Exit(2) from None


@contextmanager
def _progress() -> Iterator[ProgressCallback]:
    """A rich progress bar (rate, ETA) when stderr is a terminal; else a log line every few seconds."""
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskID,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("days  {task.fields[filled]} slots filled  {task.speed} days/s"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, transient=False) as bar:
            tasks: dict[str, TaskID] = {}

            def show(ticker: str, done: int, total: int, filled: int) -> None:
                if ticker not in tasks:
                    tasks[ticker] = bar.add_task(ticker, total=total, filled=0)
                bar.update(tasks[ticker], completed=done, filled=filled)

            yield show
        return
    started, last_line = time.monotonic(), 0.0

    def log_line(ticker: str, done: int, total: int, filled: int) -> None:
        nonlocal last_line
        now = time.monotonic()
        if now - last_line < PROGRESS_LOG_SECONDS and done < total:
            return
        last_line = now
        rate = done / max(now - started, 1e-9)
        log.info(
            "trade backfill progress",
            ticker=ticker,
            days_done=done,
            days=total,
            slots_filled=filled,
            days_per_second=round(rate, 2),
            eta_seconds=round((total - done) / rate) if rate else None,
        )

    yield log_line


def run(
    settings: Settings, tickers: tuple[str, ...] | None, since: int, until: int | None, dry_run: bool
) -> int:
    """The back-fill from `since` to the end of day `until` (default: now); the exit status."""
    to_ts = None if until is None else until + DAY_SECONDS - 1

    async def backfill() -> tuple[list[TradeBackfillReport], bool]:
        async with open_runtime(settings) as runtime:
            with _progress() as progress:
                reports = await runtime.trade_backfill(
                    tickers,
                    from_ts=since,
                    to_ts=to_ts,
                    extend_tracking=True,
                    dry_run=dry_run,
                    progress=progress,
                )
            # The chart is fine-grained for the recent day only: it fills what no trade did.
            recent = max(since, int(time.time()) - RECENT_REPAIR_SECONDS)
            chart = (
                []
                if to_ts is not None and to_ts < recent
                else await runtime.backfill(tickers, from_ts=recent, to_ts=to_ts, dry_run=dry_run)
            )
            return reports, all(report.ok for report in chart)

    reports, chart_ok = asyncio.run(backfill())
    for report in reports:
        if dry_run:
            # At least one page per instrument and day left; more where an instrument trades often.
            days_left = report.days - report.days_done_before
            requests = report.requests + days_left * max(len(report.instruments), 1)
            seconds = requests / settings.deribit_history_requests_per_second
            line = (
                f"{report.ticker:<20} slots to fill {report.missing:>8}  days {days_left:>5}"
                f" ({report.days_done_before} done before)  instruments {len(report.instruments):>3}"
                f"  requests expected >= {requests:>7}  estimated duration >= {seconds:,.0f} s"
            )
        else:
            line = (
                f"{report.ticker:<20} missing {report.missing:>8}  filled from trades {report.filled:>8}"
                f"  no trade in slot {report.no_trade:>8}  requests {report.requests:>7}"
            )
        typer.echo(line + (f"  FAILED: {report.error}" if report.error else ""))
    return 0 if chart_ok and all(report.ok for report in reports) else 1
