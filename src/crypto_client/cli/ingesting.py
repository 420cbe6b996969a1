"""The commands that store prices outside Celery: `ingest` (one tick), `stream` (the WebSocket
stream) and `backfill` (repair from Deribit's history)."""

import asyncio
import contextlib
import signal
from typing import Annotated

import typer

from crypto_client.cli.common import (
    checked_settings,
    parsed_tickers,
    require,
    require_data_origin,
    usage_error,
)


def ingest() -> None:
    """Run one ingestion tick now and print what happened to each ticker.

    Exits 0 when every ticker was stored (or already was, for this slot), 1 otherwise.
    """
    from crypto_client.domain import current_slot
    from crypto_client.ingestion.runtime import open_runtime
    from crypto_client.ingestion.tick import TickSummary
    from crypto_client.startup import database_need

    settings = checked_settings()
    require([database_need(settings)])
    require_data_origin(settings)

    async def run() -> TickSummary:
        async with open_runtime(settings) as runtime:
            return await runtime.run_tick(current_slot(settings.ingest_interval_seconds))

    summary = asyncio.run(run())
    for outcome in summary.outcomes:
        detail = outcome.error if outcome.status == "failed" else f"{outcome.price} at ts={outcome.ts}"
        typer.echo(f"{outcome.ticker:<20} {outcome.status:<10} {detail}")
    raise typer.Exit(0 if summary.ok else 1)


def stream() -> None:
    """Store Deribit's WebSocket price stream (DERIBIT_WS_URL) for every ticker in TICKERS.

    Runs until stopped; reconnects by itself. Polling may run beside it.
    """
    from crypto_client import metrics
    from crypto_client.ingestion.runtime import open_runtime
    from crypto_client.startup import database_need

    settings = checked_settings()
    require([database_need(settings)], wait_seconds=settings.startup_wait_seconds)
    require_data_origin(settings, poll=False, stream=True)
    metrics.serve_on_port(settings.metrics_port)

    async def run() -> None:
        # SIGTERM (docker stop) ends it like Ctrl-C: the batch in hand is written first.
        current = asyncio.current_task()
        assert current is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
        async with open_runtime(settings) as runtime:
            await runtime.run_stream()

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(run())


def backfill(
    ticker: Annotated[
        list[str] | None, typer.Option("--ticker", help="A ticker to repair (repeatable; default: TICKERS).")
    ] = None,
    from_ts: Annotated[int | None, typer.Option(help="Repair slots from this UNIX time on.")] = None,
    to_ts: Annotated[int | None, typer.Option(help="Repair slots up to this UNIX time.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be filled.")] = False,
    since: Annotated[
        str | None, typer.Option(help="Fill every slot from this UTC day (YYYY-MM-DD) on, from trades.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="With --since: up to this UTC day, inclusive.")] = None,
) -> None:
    """Fill missing slots from Deribit's own history.

    Without --since: from get_index_chart_data. Slots that ended less than the bound on
    pending writes ago are left to ingestion. Exits 0 when every gap within reach of Deribit's
    history was filled (slots its history cannot reach stay missing as not_repairable, slots
    it said nothing about as history_unavailable), 1 when a ticker failed.

    With --since: from the first trade inside each slot (its index_price, source 'trade'),
    then the chart for the recent day; slots no trade falls into stay missing, as
    no_trade_in_slot. Resumable: a rerun continues where a stopped one ended.
    """
    from crypto_client import history_command
    from crypto_client.ingestion.backfill import BackfillReport
    from crypto_client.ingestion.runtime import open_runtime
    from crypto_client.startup import database_need

    settings = checked_settings()
    tickers = parsed_tickers(ticker)
    if since is None and until is not None:
        raise usage_error("--until needs --since")
    if since is not None:
        if from_ts is not None or to_ts is not None:
            raise usage_error("--since/--until and --from-ts/--to-ts exclude each other")
        first = history_command.parse_day("--since", since)
        last = None if until is None else history_command.parse_day("--until", until)
        if last is not None and last < first:
            raise usage_error("--until is before --since")
    require([database_need(settings)])
    require_data_origin(settings)
    if since is not None:
        raise typer.Exit(history_command.run(settings, tickers, first, last, dry_run))

    async def run() -> list[BackfillReport]:
        async with open_runtime(settings) as runtime:
            return await runtime.backfill(tickers, from_ts=from_ts, to_ts=to_ts, dry_run=dry_run)

    reports = asyncio.run(run())
    verb = "would fill" if dry_run else "filled"
    for report in reports:
        line = (
            f"{report.ticker:<20} missing {report.missing:>7}  {verb} {report.filled:>7}"
            f"  not repairable {report.not_repairable:>7}"
            f"  history unavailable {report.history_unavailable:>7}"
        )
        typer.echo(line + (f"  FAILED: {report.error}" if report.error else ""))
    raise typer.Exit(0 if all(report.ok for report in reports) else 1)
