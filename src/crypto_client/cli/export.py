"""`crypto-client export`: the history as a data lake of Parquet files."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from crypto_client.cli.common import checked_settings, fail, parsed_tickers, require

if TYPE_CHECKING:
    from crypto_client.export.lake import LakeRun


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
    from crypto_client.domain import MAX_TS
    from crypto_client.export.lake import terminal_progress, write_lake
    from crypto_client.startup import database_need

    settings = checked_settings()
    tickers = parsed_tickers(ticker)
    if (from_ts is not None and from_ts > MAX_TS) or (to_ts is not None and to_ts > MAX_TS):
        raise fail(f"--from-ts and --to-ts must not exceed {MAX_TS}")
    if from_ts is not None and to_ts is not None and from_ts > to_ts:
        raise fail(f"--from-ts ({from_ts}) must not be after --to-ts ({to_ts})")
    require([database_need(settings, reading=True)])

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
        raise fail(
            f"cannot read the database: {first_line}", "is it migrated? (`crypto-client migrate`)"
        ) from None
    typer.echo(
        f"{file_format} lake in {out}: {result.written} files written, {result.unchanged} final files"
        f" unchanged, {result.removed} removed"
    )
    for problem in result.problems:
        typer.echo(f"crypto-client: {problem}", err=True)
    raise typer.Exit(1 if result.problems else 0)
