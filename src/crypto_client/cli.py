"""The `crypto-client` command."""

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import structlog
import typer

from crypto_client import __version__
from crypto_client.config import Settings, SettingsError, database_origin, get_settings
from crypto_client.logging import setup_logging

app = typer.Typer(
    help="Keeps a complete, exact history of Deribit index prices and serves it over HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 80, "terminal_width": 80},
)
log = structlog.get_logger("crypto_client.cli")

if TYPE_CHECKING:
    from crypto_client.export.lake import LakeRun


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"crypto-client {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Keeps a complete, exact history of Deribit index prices and serves it over HTTP."""


def _fail(message: str, hint: str | None = None) -> typer.Exit:
    typer.echo(f"crypto-client: {message}" + (f"\n  hint: {hint}" if hint else ""), err=True)
    return typer.Exit(1)


def _require_database(settings: Settings, *, reading: bool = False) -> None:
    """Stop with one line (and a hint) when the configured database (the one the API reads,
    when `reading`) cannot be reached."""
    from crypto_client.db.engine import database_problem, describe_database

    url = settings.database_read_url_value if reading else settings.database_url_value
    problem = asyncio.run(database_problem(url))
    if problem is None:
        return
    origin = database_origin(settings, reading=reading)
    hint = "check the setting, or run `crypto-client serve` without it for a local SQLite file"
    if "(in .env)" in origin:
        hint = "the .env file sets it (docker compose's values?); change or remove it for a local run"
    raise _fail(f"cannot use the database {describe_database(url)} ({origin}): {problem}", hint)


def _require_free_port(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _fail(f"port {port} on {host} is in use", "pass --port, or set API_PORT") from None
            raise _fail(
                f"cannot listen on {host}:{port}: {exc.strerror}", "check --host / API_HOST"
            ) from None


def _log_start(command: str, settings: Settings, host: str, port: int) -> None:
    from crypto_client.db.engine import describe_database

    log.info(
        f"crypto-client {command} starting",
        version=__version__,
        database=describe_database(settings.database_url_value),
        deribit=settings.deribit_rpc_url,
        tickers=",".join(settings.tickers),
        interval_seconds=settings.ingest_interval_seconds,
        listen=f"http://{host}:{port}",
    )


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _settings() -> Settings:
    """The validated settings, or exit with one line naming what is wrong."""
    try:
        settings = get_settings()
    except SettingsError as exc:
        typer.echo(f"crypto-client: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level, settings.log_format)
    return settings


Host = Annotated[str | None, typer.Option(help="Address to bind (default: API_HOST).")]
Port = Annotated[int | None, typer.Option(help="Port to bind (default: API_PORT).")]


@app.command()
def migrate(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Bring the database schema up to date (alembic upgrade)."""
    from crypto_client.db import migrations

    settings = _settings()
    _require_database(settings)
    migrations.upgrade(settings.database_url_value, revision)
    typer.echo(f"database migrated to {revision}")


@app.command()
def api(host: Host = None, port: Port = None, workers: Annotated[int, typer.Option(min=1)] = 1) -> None:
    """Run the read-only HTTP API alone (production: ingestion runs in Celery)."""
    _share_metrics_between_processes()
    from crypto_client import http_server

    settings = _settings()
    host, port = host or settings.api_host, port or settings.api_port
    _require_free_port(host, port)
    _require_database(settings, reading=True)
    _log_start("api", settings, host, port)
    http_server.serve(
        "crypto_client.api.app:create_app_from_environment", host=host, port=port, workers=workers
    )


@app.command()
def serve(
    host: Host = None,
    port: Port = None,
    simulate: Annotated[
        bool,
        typer.Option("--simulate", help="Ingest from a built-in Deribit simulator (no internet needed)."),
    ] = False,
) -> None:
    """Run everything in one process: the API plus an in-process scheduler (default SQLite)."""
    from crypto_client import http_server
    from crypto_client.serve import start_simulator

    settings = _settings()
    host, port = host or settings.api_host, port or settings.api_port
    _require_free_port(host, port)
    _require_database(settings)
    if simulate:
        # The server's worker process reads its settings anew: hand it the simulator's URLs.
        simulator = start_simulator()
        os.environ.update(simulator)
        settings = settings.model_copy(
            update={
                "deribit_rpc_url": simulator["DERIBIT_RPC_URL"],
                "deribit_ws_url": simulator["DERIBIT_WS_URL"],
            }
        )
        log.warning(
            "ingesting from the built-in simulator: the prices are made up",
            deribit=settings.deribit_rpc_url,
            stream=settings.deribit_ws_url,
        )
    _log_start("serve", settings, host, port)
    http_server.serve("crypto_client.serve:create_embedded_app_from_environment", host=host, port=port)


@app.command()
def ingest() -> None:
    """Run one ingestion tick now and print what happened to each ticker.

    Exits 0 when every ticker was stored (or already was, for this slot), 1 otherwise.
    """
    from crypto_client.domain import current_slot
    from crypto_client.ingestion.runtime import open_runtime
    from crypto_client.ingestion.tick import TickSummary

    settings = _settings()

    async def run() -> TickSummary:
        async with open_runtime(settings) as runtime:
            return await runtime.run_tick(current_slot(settings.ingest_interval_seconds))

    summary = asyncio.run(run())
    for outcome in summary.outcomes:
        detail = outcome.error if outcome.status == "failed" else f"{outcome.price} at ts={outcome.ts}"
        typer.echo(f"{outcome.ticker:<20} {outcome.status:<10} {detail}")
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
def stream() -> None:
    """Store Deribit's WebSocket price stream (DERIBIT_WS_URL) for every ticker in TICKERS.

    Runs until stopped; reconnects by itself. Polling may run beside it.
    """
    from crypto_client import metrics
    from crypto_client.ingestion.runtime import open_runtime

    settings = _settings()
    _require_database(settings)
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


@app.command()
def backfill(
    ticker: Annotated[
        list[str] | None, typer.Option("--ticker", help="A ticker to repair (repeatable; default: TICKERS).")
    ] = None,
    from_ts: Annotated[int | None, typer.Option(help="Repair slots from this UNIX time on.")] = None,
    to_ts: Annotated[int | None, typer.Option(help="Repair slots up to this UNIX time.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be filled.")] = False,
) -> None:
    """Fill missing slots from Deribit's own history (get_index_chart_data).

    Slots that ended less than the bound on pending writes ago are left to ingestion. Exits
    0 when every gap within reach of Deribit's history was filled (slots its history cannot
    reach stay missing as not_repairable, slots it said nothing about as history_unavailable),
    1 when a ticker failed.
    """
    from crypto_client.domain import parse_ticker
    from crypto_client.ingestion.backfill import BackfillReport
    from crypto_client.ingestion.runtime import open_runtime

    settings = _settings()
    try:
        tickers = tuple(parse_ticker(name) for name in ticker) if ticker else None
    except ValueError as exc:
        typer.echo(f"crypto-client: --ticker: {exc}", err=True)
        raise typer.Exit(2) from None

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


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="The lake's folder (created when missing).")],
    file_format: Annotated[
        Literal["parquet"], typer.Option("--format", help="The files' format (parquet).")
    ] = "parquet",
    ticker: Annotated[
        list[str] | None,
        typer.Option("--ticker", help="A ticker to export (repeatable; default: every stored one)."),
    ] = None,
    from_ts: Annotated[int | None, typer.Option(min=0, help="Export rows from this UNIX time on.")] = None,
    to_ts: Annotated[int | None, typer.Option(min=0, help="Export rows up to this UNIX time.")] = None,
) -> None:
    """Write the history as a data lake: DIR/<ticker>/<YYYY-MM-DD>.parquet and DIR/manifest.json.

    Files of closed, complete days are final: a rerun checks their sha256 and leaves them;
    other days are rewritten. Exits 1 when a final file is missing or changed.
    """
    from sqlalchemy.exc import DBAPIError

    from crypto_client.db.engine import create_engine
    from crypto_client.db.repository import PriceReader
    from crypto_client.domain import MAX_TS, parse_ticker
    from crypto_client.export.lake import terminal_progress, write_lake

    settings = _settings()
    try:
        tickers = list(dict.fromkeys(parse_ticker(name) for name in ticker)) if ticker else None
    except ValueError as exc:
        typer.echo(f"crypto-client: --ticker: {exc}", err=True)
        raise typer.Exit(2) from None
    if (from_ts is not None and from_ts > MAX_TS) or (to_ts is not None and to_ts > MAX_TS):
        raise _fail(f"--from-ts and --to-ts must not exceed {MAX_TS}")
    if from_ts is not None and to_ts is not None and from_ts > to_ts:
        raise _fail(f"--from-ts ({from_ts}) must not be after --to-ts ({to_ts})")
    _require_database(settings, reading=True)

    async def run() -> "LakeRun":
        engine = create_engine(settings.database_read_url_value, read_only=True)

        @contextlib.asynccontextmanager
        async def open_reader() -> AsyncIterator[PriceReader]:
            async with engine.connect() as connection:
                yield PriceReader(connection)

        try:
            with terminal_progress() as progress:
                return await write_lake(
                    open_reader,
                    out,
                    tickers,
                    interval=settings.ingest_interval_seconds,
                    from_ts=from_ts,
                    to_ts=to_ts,
                    progress=progress,
                )
        finally:
            await engine.dispose()

    try:
        result = asyncio.run(run())
    except DBAPIError as exc:
        first_line = str(exc.orig).splitlines()[0] if str(exc.orig) else type(exc.orig).__name__
        raise _fail(
            f"cannot read the database: {first_line}", "is it migrated? (`crypto-client migrate`)"
        ) from None
    typer.echo(
        f"{file_format} lake in {out}: {result.written} files written, {result.unchanged} final files"
        f" unchanged, {result.removed} removed"
    )
    for problem in result.problems:
        typer.echo(f"crypto-client: {problem}", err=True)
    raise typer.Exit(1 if result.problems else 0)


@app.command()
def sim(
    host: Annotated[str, typer.Option(envvar="SIM_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SIM_PORT")] = 8001,
    seed: Annotated[int, typer.Option(envvar="SIM_SEED", help="Seed of prices and fault draws.")] = 0,
    latency_ms: Annotated[float, typer.Option(envvar="SIM_LATENCY_MS", min=0)] = 0.0,
    error_rate: Annotated[float, typer.Option(envvar="SIM_ERROR_RATE", min=0, max=1)] = 0.0,
    timeout_rate: Annotated[float, typer.Option(envvar="SIM_TIMEOUT_RATE", min=0, max=1)] = 0.0,
    drop_rate: Annotated[float, typer.Option(envvar="SIM_DROP_RATE", min=0, max=1)] = 0.0,
    malformed_rate: Annotated[float, typer.Option(envvar="SIM_MALFORMED_RATE", min=0, max=1)] = 0.0,
    rate_limit_rate: Annotated[float, typer.Option(envvar="SIM_RATE_LIMIT_RATE", min=0, max=1)] = 0.0,
    outage: Annotated[bool, typer.Option(envvar="SIM_OUTAGE", help="Answer every request with 503.")] = False,
    chart_empty_rate: Annotated[float, typer.Option(envvar="SIM_CHART_EMPTY_RATE", min=0, max=1)] = 0.0,
    chart_out_of_window_rate: Annotated[
        float, typer.Option(envvar="SIM_CHART_OUT_OF_WINDOW_RATE", min=0, max=1)
    ] = 0.0,
    chart_bad_point_rate: Annotated[
        float, typer.Option(envvar="SIM_CHART_BAD_POINT_RATE", min=0, max=1)
    ] = 0.0,
    chart_step_scale: Annotated[
        float,
        typer.Option(envvar="SIM_CHART_STEP_SCALE", min=0.001, help="Scale of the chart's point spacing."),
    ] = 1.0,
    ws_hostile: Annotated[
        list[str] | None,
        typer.Option(
            "--ws-hostile",
            help="A hostile frame the stream sends once a client subscribes (repeatable): truncated, "
            "not_json, not_an_object, binary, deep_nesting, huge, heartbeat_params_not_object, "
            "timestamp_overflow, string_price, index_name_mismatch.",
        ),
    ] = None,
    ws_unsubscribed_channel: Annotated[
        list[str] | None,
        typer.Option(
            "--ws-unsubscribed-channel",
            help="A channel every stream client gets, subscribed or not (repeatable).",
        ),
    ] = None,
    ws_drop_after: Annotated[
        int,
        typer.Option(
            envvar="SIM_WS_DROP_AFTER", min=0, help="Close each stream connection after N notifications."
        ),
    ] = 0,
    ws_stall: Annotated[
        bool, typer.Option(envvar="SIM_WS_STALL", help="Stream connections go silent without closing.")
    ] = False,
) -> None:
    """Run the Deribit simulator (offline development and tests).

    Faults can be changed while it runs: PUT /_sim/faults with a JSON object.
    """
    import uvicorn

    from crypto_client.sim.app import Simulator, create_sim_app
    from crypto_client.sim.faults import Faults

    setup_logging("INFO")
    faults = Faults(
        latency_ms=latency_ms,
        error_rate=error_rate,
        timeout_rate=timeout_rate,
        drop_rate=drop_rate,
        malformed_rate=malformed_rate,
        rate_limit_rate=rate_limit_rate,
        outage=outage,
        chart_empty_rate=chart_empty_rate,
        chart_out_of_window_rate=chart_out_of_window_rate,
        chart_bad_point_rate=chart_bad_point_rate,
    )
    try:
        faults = faults.update(
            {
                "ws_hostile_next": ws_hostile or (),
                "ws_unsubscribed_channels": ws_unsubscribed_channel or (),
                "ws_drop_after": ws_drop_after,
                "ws_stall": ws_stall,
            }
        )
    except ValueError as exc:
        raise _fail(f"--ws-hostile: {exc}") from None
    uvicorn.run(
        create_sim_app(Simulator(seed, faults, chart_step_scale)),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
    )


@app.command(context_settings=_PASS_THROUGH)
def worker(ctx: typer.Context) -> None:
    """Run a Celery worker. Celery's own options follow, e.g. `--concurrency 4`; list them
    with `crypto-client worker -- --help`."""
    _celery(["worker", *ctx.args])


@app.command(context_settings=_PASS_THROUGH)
def beat(ctx: typer.Context) -> None:
    """Run Celery beat, the scheduler; run exactly one. Celery's own options follow; list them
    with `crypto-client beat -- --help`."""
    _celery(["beat", *ctx.args])


def _share_metrics_between_processes() -> None:
    """This command's processes (API workers, Celery's pool) record their metrics as files in
    one directory, so the process that serves them reports all. prometheus_client reads the
    variable when it is imported: this must run first."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess directory was set")
    directory = Path(
        os.environ.get(MULTIPROCESS_DIR_VARIABLE) or tempfile.mkdtemp(prefix="crypto-client-metrics-")
    )
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # an earlier run's
        stale.unlink()
    os.environ[MULTIPROCESS_DIR_VARIABLE] = str(directory)


MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def _celery(argv: list[str]) -> None:
    import click

    _settings()
    if argv[0] == "worker":
        _share_metrics_between_processes()
    from crypto_client.worker.celery_app import celery_app

    try:
        celery_app.start(argv)
    except click.ClickException as exc:
        raise _fail(
            f"{argv[0]}: {exc.format_message()}", f"crypto-client {argv[0]} -- --help lists the options"
        ) from None
    sys.exit(0)
