"""The Celery commands: `worker` and `beat`, which pass Celery's own options through."""

import sys

import typer

from crypto_client.cli.common import (
    checked_settings,
    fail,
    require_data_origin,
    share_metrics_between_processes,
)

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def worker(ctx: typer.Context) -> None:
    """Run a Celery worker. Celery's own options follow, e.g. `--concurrency 4`; list them
    with `crypto-client worker -- --help`."""
    _celery(["worker", *ctx.args])


def beat(ctx: typer.Context) -> None:
    """Run Celery beat, the scheduler; run exactly one. Celery's own options follow; list them
    with `crypto-client beat -- --help`."""
    _celery(["beat", *ctx.args])


def _celery(argv: list[str]) -> None:
    import click

    settings = checked_settings()
    if argv[0] == "worker":
        share_metrics_between_processes()
        require_data_origin(settings)
    from crypto_client.worker.celery_app import celery_app

    try:
        celery_app.start(argv)
    except click.ClickException as exc:
        raise fail(
            f"{argv[0]}: {exc.format_message()}", f"crypto-client {argv[0]} -- --help lists the options"
        ) from None
    sys.exit(0)
