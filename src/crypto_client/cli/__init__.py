"""The `crypto-client` command: one module per family of subcommands, assembled here in the
order `--help` lists them. A subcommand imports its libraries when it runs, so `--help` stays
quick and `api` and `worker` can set up metrics before prometheus_client loads."""

from typing import Annotated

import typer

from crypto_client import __version__
from crypto_client.cli.database import keys_app, migrate
from crypto_client.cli.export import export
from crypto_client.cli.ingesting import backfill, ingest, stream
from crypto_client.cli.serving import api, serve
from crypto_client.cli.simulator import sim
from crypto_client.cli.worker import PASS_THROUGH, beat, worker

app = typer.Typer(
    help="Keeps a complete, exact history of Deribit index prices and serves it over HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 80, "terminal_width": 80},
)


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


for command in (migrate, api, serve, ingest, stream, backfill, export, sim):
    app.command()(command)
app.command(context_settings=PASS_THROUGH)(worker)
app.command(context_settings=PASS_THROUGH)(beat)
app.add_typer(keys_app, name="keys")
