"""What every `crypto-client` command shares: the one-line failure, the checked settings and
start-up needs, the metrics directory of multi-process commands, option types."""

import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import structlog
import typer

from crypto_client.config import Settings, SettingsError, get_settings
from crypto_client.logging import setup_logging

if TYPE_CHECKING:
    from crypto_client.startup import Need

log = structlog.get_logger("crypto_client.cli")

Host = Annotated[str | None, typer.Option(help="Address to bind (default: API_HOST).")]
Port = Annotated[int | None, typer.Option(help="Port to bind (default: API_PORT).")]


def fail(message: str, hint: str | None = None) -> typer.Exit:
    """The one line (and hint) a command stops with; raise what it returns."""
    typer.echo(f"crypto-client: {message}" + (f"\n  hint: {hint}" if hint else ""), err=True)
    return typer.Exit(1)


def usage_error(message: str) -> typer.Exit:
    """The one line for options that do not fit together (exit 2, as click's own)."""
    typer.echo(f"crypto-client: {message}", err=True)
    return typer.Exit(2)


def checked_settings() -> Settings:
    """The validated settings, or exit with one line naming what is wrong."""
    try:
        settings = get_settings()
    except SettingsError as exc:
        raise usage_error(str(exc)) from None
    setup_logging(settings.log_level, settings.log_format)
    return settings


def parsed_tickers(names: list[str] | None) -> tuple[str, ...] | None:
    """The `--ticker` options, each checked and once (None when none was given), or exit with
    one line."""
    from crypto_client.domain import parse_ticker

    try:
        return tuple(dict.fromkeys(parse_ticker(name) for name in names)) if names else None
    except ValueError as exc:
        raise usage_error(f"--ticker: {exc}") from None


def require(needs: "Sequence[Need]", *, wait_seconds: float = 0) -> None:
    """Stop with one line unless every need is met (waiting up to `wait_seconds` for them)."""
    from crypto_client import startup

    try:
        startup.require(needs, wait_seconds=wait_seconds)
    except startup.StartupError as exc:
        raise fail(str(exc), exc.hint) from None


def require_data_origin(settings: Settings, *, poll: bool = True, stream: bool = False) -> None:
    """Stop with one line when the database holds prices of another origin than this runner's
    sources (see `crypto_client.origin`); each write checks again."""
    from crypto_client.db.origins import DataOriginError
    from crypto_client.ingestion.runtime import check_data_origin

    try:
        asyncio.run(check_data_origin(settings, poll=poll, stream=stream))
    except DataOriginError as exc:
        raise fail(str(exc)) from None


MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def share_metrics_between_processes() -> None:
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
