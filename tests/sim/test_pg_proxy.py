"""The PostgreSQL fault proxy itself, against the real server: each fault does what it says."""

import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.support.databases import create_pg_database, drop_pg_database, plain_dsn
from tests.support.pg_proxy import PgProxy

# What asyncpg raises for a connection that died, depending on when it notices.
LOST = (asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.InterfaceError, OSError)


@pytest.fixture
async def database() -> AsyncIterator[str]:
    url = await create_pg_database(migrate=False, prefix="cc_proxy")
    connection = await asyncpg.connect(plain_dsn(url))
    await connection.execute("CREATE TABLE t (x int)")
    await connection.close()
    yield url
    await drop_pg_database(url)


@pytest.fixture
def proxy(database: str) -> Iterator[PgProxy]:
    with PgProxy("127.0.0.1", make_url(database).port or 5432) as proxy:
        yield proxy


async def rows(database: str) -> list[int]:
    connection = await asyncpg.connect(plain_dsn(database))
    try:
        return [row["x"] for row in await connection.fetch("SELECT x FROM t ORDER BY x")]
    finally:
        await connection.close()


async def test_queries_pass_through(database: str, proxy: PgProxy) -> None:
    connection = await asyncpg.connect(plain_dsn(proxy.url(database)))
    async with connection.transaction():
        await connection.execute("INSERT INTO t VALUES ($1)", 1)
    assert await connection.fetchval("SELECT count(*) FROM t") == 1
    await connection.close()
    assert proxy.cuts == 0


@pytest.mark.parametrize(("mode", "committed"), [("before", []), ("after", [7])])
async def test_a_cut_at_commit_loses_the_answer(
    database: str, proxy: PgProxy, mode: str, committed: list[int]
) -> None:
    connection = await asyncpg.connect(plain_dsn(proxy.url(database)))
    proxy.cut_next_commit(mode)  # type: ignore[arg-type]
    with pytest.raises(LOST):
        async with connection.transaction():
            await connection.execute("INSERT INTO t VALUES ($1)", 7)
    assert proxy.cuts == 1
    assert await rows(database) == committed
    # One cut only: the next connection commits normally.
    again = await asyncpg.connect(plain_dsn(proxy.url(database)))
    async with again.transaction():
        await again.execute("INSERT INTO t VALUES ($1)", 8)
    await again.close()
    assert await rows(database) == [*committed, 8]


async def test_a_cut_mid_query(database: str, proxy: PgProxy) -> None:
    connection = await asyncpg.connect(plain_dsn(proxy.url(database)))
    proxy.cut_mid_query()
    with pytest.raises(LOST):
        await connection.fetchval("SELECT pg_sleep(0.2)")
    assert proxy.cuts == 1


async def test_cut_all_and_latency(database: str, proxy: PgProxy) -> None:
    first = await asyncpg.connect(plain_dsn(proxy.url(database)))
    second = await asyncpg.connect(plain_dsn(proxy.url(database)))
    proxy.cut_all()
    for connection in (first, second):
        with pytest.raises(LOST):
            await connection.fetchval("SELECT 1")
    third = await asyncpg.connect(plain_dsn(proxy.url(database)))
    proxy.set_latency(0.3)
    started = time.monotonic()
    assert await third.fetchval("SELECT 1") == 1
    assert time.monotonic() - started >= 0.6  # the query and its answer were each delayed
    await third.close()
