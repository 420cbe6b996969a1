"""The HTTP commands: `api` (the API alone) and `serve` (everything in one process)."""

import asyncio
import errno
import os
import socket
from typing import Annotated

import typer
from pydantic import SecretStr

from crypto_client import __version__
from crypto_client.cli.common import (
    Host,
    Port,
    checked_settings,
    fail,
    log,
    require,
    require_data_origin,
    share_metrics_between_processes,
)
from crypto_client.config import DEMO_SQLITE_URL, Settings


def api(host: Host = None, port: Port = None, workers: Annotated[int, typer.Option(min=1)] = 1) -> None:
    """Run the read-only HTTP API alone (production: ingestion runs in Celery)."""
    share_metrics_between_processes()
    from crypto_client import http_server, metrics

    settings = checked_settings()
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

    settings = checked_settings()
    host, port = host or settings.api_host, port or settings.api_port
    _require_free_port(host, port)
    if simulate and settings.database_url is None and not settings.postgres_host:
        # The demo's made-up prices get a file of their own (the app's factory reads it anew).
        os.environ["DATABASE_URL"] = DEMO_SQLITE_URL
        settings = settings.model_copy(update={"database_url": SecretStr(DEMO_SQLITE_URL)})
    require([database_need(settings, migrated=False)])  # serve migrates it
    if simulate:
        if sim_port:
            _require_free_port("127.0.0.1", sim_port, option="--sim-port")
        # The app's factory reads its settings anew: hand it the simulator's URLs.
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
    require_data_origin(settings, stream=settings.stream_enabled)
    _log_start("serve", settings, host, port)
    http_server.serve(
        "crypto_client.serve:create_embedded_app_from_environment",
        host=host,
        port=port,
        idle_timeout_seconds=settings.api_keepalive_timeout_seconds,
    )


def _require_free_port(host: str, port: int, *, option: str = "--port") -> None:
    """Stop with one line when `host:port` cannot be listened on (before anything starts)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                hint = "pass --port, or set API_PORT" if option == "--port" else f"pass another {option}"
                raise fail(f"port {port} on {host} is in use", hint) from None
            raise fail(f"cannot listen on {host}:{port}: {exc.strerror}", "check --host / API_HOST") from None


def _warn_without_database(settings: Settings) -> None:
    """The API outlives its database: it starts anyway and answers 503 until it is there."""
    from crypto_client.startup import database_need, first_problem

    problem = asyncio.run(first_problem([database_need(settings, reading=True)]))
    if problem is not None:
        log.warning(f"{problem}; starting anyway: /health and data endpoints answer 503 until it answers")


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
