"""The commands that administer the database itself: `migrate` and the `keys` group."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from crypto_client.cli.common import checked_settings, fail, require
from crypto_client.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

T = TypeVar("T")


def migrate(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Bring the database schema up to date (alembic upgrade)."""
    from crypto_client.db import migrations
    from crypto_client.startup import database_need

    settings = checked_settings()
    require([database_need(settings, migrated=False)])
    migrations.upgrade(settings.database_url_value, revision)
    typer.echo(f"database migrated to {revision}")


keys_app = typer.Typer(help="Manage API keys (API_KEYS_REQUIRED=true makes the API ask for one).")


def _in_key_store(
    settings: Settings, work: "Callable[[AsyncConnection], Awaitable[T]]", *, write: bool = True
) -> T:
    """Run `work` on one connection to the database (in a transaction when it writes)."""
    from crypto_client.db.engine import create_engine
    from crypto_client.startup import database_need

    require([database_need(settings)])
    engine = create_engine(settings.database_url_value, pool_size=1)

    async def run() -> T:
        try:
            async with engine.begin() if write else engine.connect() as connection:
                return await work(connection)
        finally:
            await engine.dispose()

    return asyncio.run(run())


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
        raise fail("NAME: 1 to 64 printable characters")
    if rate is not None:
        try:
            parse_rate_limit(rate)
        except ValueError as exc:
            raise fail(f"--rate: {exc}") from None
    settings = checked_settings()
    key = generate_key()

    async def create(connection: "AsyncConnection") -> None:
        await api_keys.create_key(connection, name, key_digest(key), rate, int(time.time()))

    try:
        _in_key_store(settings, create)
    except api_keys.KeyNameTakenError:
        raise fail(f"a key named {name!r} exists", "revoke it first, or choose another name") from None
    typer.echo(key)
    typer.echo(f"key {name!r} created: it is shown only now, keep it somewhere safe", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """List the keys: name, created, last used (a minute behind at most), quota."""
    from datetime import UTC, datetime

    from crypto_client.db import api_keys

    rows = _in_key_store(checked_settings(), api_keys.list_keys, write=False)

    def when(ts: int | None) -> str:
        return "never" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    typer.echo(f"{'NAME':<24} {'CREATED':<20} {'LAST USED':<20} QUOTA")
    for row in rows:
        quota = row.rate_limit or "API_RATE_LIMIT"
        typer.echo(f"{row.name:<24} {when(row.created_at):<20} {when(row.last_used_at):<20} {quota}")


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Delete a key: every API process refuses it within a few seconds."""
    from crypto_client.db import api_keys

    async def revoke(connection: "AsyncConnection") -> bool:
        return await api_keys.revoke_key(connection, name)

    if not _in_key_store(checked_settings(), revoke):
        raise fail(f"no key named {name!r}", "`crypto-client keys list` shows them")
    typer.echo(f"key {name!r} revoked")
