"""The `crypto-client` command."""

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import structlog
import typer
from pydantic import SecretStr

from crypto_client import __version__
from crypto_client.config import DEMO_SQLITE_URL, Settings, SettingsError, get_settings
from crypto_client.logging import setup_logging

if TYPE_CHECKING:
    from crypto_client.startup import Need

app = typer.Typer(
    help="Keeps a complete, exact history of Deribit index prices and serves it over HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 80, "terminal_width": 80},
)
if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

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


def _warn_without_database(settings: Settings) -> None:
    """The API outlives its database: it starts anyway and answers 503 until it is there."""
    from crypto_client.startup import database_need, first_problem

    problem = asyncio.run(first_problem([database_need(settings, reading=True)]))
    if problem is not None:
        log.warning(f"{problem}; starting anyway: /health and data endpoints answer 503 until it answers")


def _require(needs: "Sequence[Need]", *, wait_seconds: float = 0) -> None:
    """Stop with one line unless every need is met (waiting up to `wait_seconds` for them)."""
    from crypto_client.startup import StartupError, require

    try:
        require(needs, wait_seconds=wait_seconds)
    except StartupError as exc:
        raise _fail(str(exc), exc.hint) from None


def _require_data_origin(settings: Settings, *, poll: bool = True, stream: bool = False) -> None:
    """Stop with one line when the database holds prices of another origin than this runner's
    sources (see `crypto_client.origin`); each write checks again."""
    from crypto_client.db.origins import DataOriginError
    from crypto_client.ingestion.runtime import check_data_origin

    try:
        asyncio.run(check_data_origin(settings, poll=poll, stream=stream))
    except DataOriginError as exc:
        raise _fail(str(exc)) from None


def _require_free_port(host: str, port: int, *, option: str = "--port") -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                hint = "pass --port, or set API_PORT" if option == "--port" else f"pass another {option}"
                raise _fail(f"port {port} on {host} is in use", hint) from None
            raise _fail(
                f"cannot listen on {host}:{port}: {exc.strerror}", "check --host / API_HOST"
            ) from None


def _warn_if_exposed(settings: Settings, host: str) -> None:
    """One line when the API listens beyond loopback and anyone who reaches it reads it."""
    import ipaddress

    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost":
            return
    if settings.api_keys_required:
        return
    exposed = "every price, export and stream"
    if settings.metrics_token is None:
        exposed += ", and /metrics (the service's internals)"
    log.warning(
        f"the API listens on {host} with no API keys: anyone who reaches it reads {exposed};"
        " set API_KEYS_REQUIRED=true (and METRICS_TOKEN), see `crypto-client keys`"
    )


def _log_start(command: str, settings: Settings, host: str, port: int) -> None:
    from crypto_client.db.engine import describe_database

    _warn_if_exposed(settings, host)
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
    from crypto_client.startup import database_need

    settings = _settings()
    _require([database_need(settings, migrated=False)])
    migrations.upgrade(settings.database_url_value, revision)
    typer.echo(f"database migrated to {revision}")


@app.command()
def api(host: Host = None, port: Port = None, workers: Annotated[int, typer.Option(min=1)] = 1) -> None:
    """Run the read-only HTTP API alone (production: ingestion runs in Celery)."""
    _share_metrics_between_processes()
    from crypto_client import http_server, metrics

    settings = _settings()
    host, port = host or settings.api_host, port or settings.api_port
    _require_free_port(host, port)
    _warn_without_database(settings)
    _log_start("api", settings, host, port)
    metrics.serve_on_port(settings.metrics_port)
    http_server.serve(
        "crypto_client.api.app:create_app_from_environment",
        host=host,
        port=port,
        workers=workers,
        idle_timeout_seconds=settings.api_keepalive_timeout_seconds,
    )


@app.command()
def serve(
    host: Host = None,
    port: Port = None,
    simulate: Annotated[
        bool,
        typer.Option("--simulate", help="Ingest from a built-in Deribit simulator (no internet needed)."),
    ] = False,
    sim_port: Annotated[
        int,
        typer.Option(min=0, max=65535, help="With --simulate: the simulator's port (0: any free one)."),
    ] = 0,
) -> None:
    """Run everything in one process: the API plus an in-process scheduler (default SQLite)."""
    from crypto_client import http_server
    from crypto_client.serve import start_simulator
    from crypto_client.startup import database_need

    settings = _settings()
    host, port = host or settings.api_host, port or settings.api_port
    _require_free_port(host, port)
    if simulate and settings.database_url is None and not settings.postgres_host:
        # The demo's made-up prices get a file of their own (the server worker reads it anew).
        os.environ["DATABASE_URL"] = DEMO_SQLITE_URL
        settings = settings.model_copy(update={"database_url": SecretStr(DEMO_SQLITE_URL)})
    _require([database_need(settings, migrated=False)])  # serve migrates it
    if simulate:
        if sim_port:
            _require_free_port("127.0.0.1", sim_port, option="--sim-port")
        # The server's worker process reads its settings anew: hand it the simulator's URLs.
        simulator = start_simulator(sim_port)
        os.environ.update(simulator)
        settings = settings.model_copy(
            update={
                "deribit_rpc_url": simulator["DERIBIT_RPC_URL"],
                "deribit_ws_url": simulator["DERIBIT_WS_URL"],
            }
        )
        log.warning(
            "ingesting from the built-in simulator: the prices are made up",
            simulator=settings.deribit_rpc_url.removesuffix("/api/v2"),
            deribit=settings.deribit_rpc_url,
            stream=settings.deribit_ws_url,
            faults="PUT <simulator>/_sim/faults (see the simulator's page in the docs)",
        )
    _require_data_origin(settings, stream=settings.stream_enabled)
    _log_start("serve", settings, host, port)
    http_server.serve(
        "crypto_client.serve:create_embedded_app_from_environment",
        host=host,
        port=port,
        idle_timeout_seconds=settings.api_keepalive_timeout_seconds,
    )


keys_app = typer.Typer(help="Manage API keys (API_KEYS_REQUIRED=true makes the API ask for one).")
app.add_typer(keys_app, name="keys")


def _key_store(settings: Settings) -> "AsyncEngine":
    from crypto_client.db.engine import create_engine
    from crypto_client.startup import database_need

    _require([database_need(settings)])
    return create_engine(settings.database_url_value, pool_size=1)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for (unique, up to 64 characters).")],
    rate: Annotated[
        str | None,
        typer.Option(help="This key's own quota, e.g. 10/second;1000/hour (default: API_RATE_LIMIT)."),
    ] = None,
) -> None:
    """Create a key and print it, once: only its hash is stored."""
    import time

    from crypto_client.api.auth import generate_key, key_digest
    from crypto_client.api.quotas import parse_rate_limit
    from crypto_client.db import api_keys

    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise _fail("NAME: 1 to 64 printable characters")
    if rate is not None:
        try:
            parse_rate_limit(rate)
        except ValueError as exc:
            raise _fail(f"--rate: {exc}") from None
    settings = _settings()
    key = generate_key()

    engine = _key_store(settings)

    async def run() -> None:
        try:
            async with engine.begin() as connection:
                await api_keys.create_key(connection, name, key_digest(key), rate, int(time.time()))
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except api_keys.KeyNameTakenError:
        raise _fail(f"a key named {name!r} exists", "revoke it first, or choose another name") from None
    typer.echo(key)
    typer.echo(f"key {name!r} created: it is shown only now, keep it somewhere safe", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """List the keys: name, created, last used (a minute behind at most), quota."""
    from datetime import UTC, datetime

    from crypto_client.db import api_keys

    settings = _settings()

    engine = _key_store(settings)

    async def run() -> list[api_keys.ApiKeyRow]:
        try:
            async with engine.connect() as connection:
                return await api_keys.list_keys(connection)
        finally:
            await engine.dispose()

    def when(ts: int | None) -> str:
        return "never" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    typer.echo(f"{'NAME':<24} {'CREATED':<20} {'LAST USED':<20} QUOTA")
    for row in asyncio.run(run()):
        quota = row.rate_limit or "API_RATE_LIMIT"
        typer.echo(f"{row.name:<24} {when(row.created_at):<20} {when(row.last_used_at):<20} {quota}")


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Delete a key: every API process refuses it within a few seconds."""
    from crypto_client.db import api_keys

    settings = _settings()

    engine = _key_store(settings)

    async def run() -> bool:
        try:
            async with engine.begin() as connection:
                return await api_keys.revoke_key(connection, name)
        finally:
            await engine.dispose()

    if not asyncio.run(run()):
        raise _fail(f"no key named {name!r}", "`crypto-client keys list` shows them")
    typer.echo(f"key {name!r} revoked")


@app.command()
def ingest() -> None:
    """Run one ingestion tick now and print what happened to each ticker.

    Exits 0 when every ticker was stored (or already was, for this slot), 1 otherwise.
    """
    from crypto_client.domain import current_slot
    from crypto_client.ingestion.runtime import open_runtime
    from crypto_client.ingestion.tick import TickSummary
    from crypto_client.startup import database_need

    settings = _settings()
    _require([database_need(settings)])
    _require_data_origin(settings)

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
    from crypto_client.startup import database_need

    settings = _settings()
    _require([database_need(settings)], wait_seconds=settings.startup_wait_seconds)
    _require_data_origin(settings, poll=False, stream=True)
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
    from crypto_client.domain import parse_ticker
    from crypto_client.ingestion.backfill import BackfillReport
    from crypto_client.ingestion.runtime import open_runtime
    from crypto_client.startup import database_need

    settings = _settings()
    try:
        tickers = tuple(parse_ticker(name) for name in ticker) if ticker else None
    except ValueError as exc:
        typer.echo(f"crypto-client: --ticker: {exc}", err=True)
        raise typer.Exit(2) from None

    if since is None and until is not None:
        typer.echo("crypto-client: --until needs --since", err=True)
        raise typer.Exit(2)
    if since is not None:
        if from_ts is not None or to_ts is not None:
            typer.echo("crypto-client: --since/--until and --from-ts/--to-ts exclude each other", err=True)
            raise typer.Exit(2)
        first = history_command.parse_day("--since", since)
        last = None if until is None else history_command.parse_day("--until", until)
        if last is not None and last < first:
            typer.echo("crypto-client: --until is before --since", err=True)
            raise typer.Exit(2)
    _require([database_need(settings)])
    _require_data_origin(settings)
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
    from crypto_client.db.reader import PriceReader
    from crypto_client.domain import MAX_TS, parse_ticker
    from crypto_client.export.lake import terminal_progress, write_lake
    from crypto_client.startup import database_need

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
    _require([database_need(settings, reading=True)])

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
    max_connections: Annotated[
        int | None,
        typer.Option(
            envvar="SIM_MAX_CONNECTIONS", min=1, help="Refuse connections beyond this many with HTTP 429."
        ),
    ] = None,
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
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from crypto_client.sim.app import Simulator, create_sim_app
    from crypto_client.sim.connections import capped_protocol
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
        max_connections=max_connections,
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
    simulator = Simulator(seed, faults, chart_step_scale)
    uvicorn.run(
        create_sim_app(simulator),
        host=host,
        port=port,
        http=capped_protocol(
            AutoHTTPProtocol, simulator.connections, lambda: simulator.faults.default.max_connections
        ),
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

    settings = _settings()
    if argv[0] == "worker":
        _share_metrics_between_processes()
        _require_data_origin(settings)
    from crypto_client.worker.celery_app import celery_app

    try:
        celery_app.start(argv)
    except click.ClickException as exc:
        raise _fail(
            f"{argv[0]}: {exc.format_message()}", f"crypto-client {argv[0]} -- --help lists the options"
        ) from None
    sys.exit(0)
