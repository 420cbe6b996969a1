import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Table, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from crypto_client.config import get_settings
from crypto_client.db.models import Base
from crypto_client.setting_values import async_url

config = context.config
# `crypto-client migrate` configures logging itself; the plain `alembic` command uses the ini's.
if config.config_file_name is not None and not config.attributes.get("configured_logging"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _include_object(
    item: object, name: str | None, kind: str, reflected: bool, compare_to: object | None
) -> bool:
    """Autogenerate against PostgreSQL leaves alone the tables only SQLite has."""
    if kind == "table" and isinstance(item, Table) and item.info.get("sqlite_only"):
        return bool(context.get_context().dialect.name == "sqlite")
    return True


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url_value


def run_migrations_offline() -> None:
    context.configure(
        url=async_url(_url()).render_as_string(hide_password=False),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


# Any fixed number: every `crypto-client migrate` / `serve` of this service takes the same lock.
_MIGRATION_LOCK_ID = 0x63727970746F  # "crypto"


def _run_with(connection: Connection) -> None:
    # Two migrations started at once on a fresh PostgreSQL database would both create the
    # tables; a session advisory lock makes the second wait and then find the schema at head.
    # (SQLite serializes writers itself.)
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        connection.commit()
    # Batch mode lets later revisions alter SQLite tables, which have no ALTER COLUMN.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        include_object=_include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(async_url(_url()), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_with)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(_run_online())
