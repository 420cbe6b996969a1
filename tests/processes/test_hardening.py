"""What a hostile tester found: odd SQLite paths, HEAD, control characters in logs, bad
database URLs, foreign digits in cursors, Host reflection, a role that cannot read, runaway
queries and clients that leave."""

import asyncio
import base64
import logging
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice
from crypto_client.logging import setup_logging
from tests.support import local_http
from tests.support.api import api_client
from tests.support.databases import plain_dsn
from tests.support.services import ApiServer
from tests.support.settings import make_settings
from tests.support.waiting import wait_until_async


async def store(engine: AsyncEngine, *points: tuple[int, str]) -> None:
    async with engine.begin() as connection:
        await PriceWriter(connection).insert_many([NewPrice("btc_usd", Decimal(p), ts) for ts, p in points])


@pytest.mark.parametrize("directory", ["a#b", "100% sure", "what?yes", "sp ace"])
async def test_sqlite_paths_with_uri_characters_work_for_both_engines(tmp_path: Path, directory: str) -> None:
    path = tmp_path / directory / "db.sqlite"
    path.parent.mkdir()
    url = "sqlite:///" + quote(str(path))  # '?' must be escaped in a URL; the rest may be too
    await asyncio.to_thread(migrations.upgrade, url)
    engine = create_engine(url)
    await store(engine, (100, "1.5"))
    await engine.dispose()
    async with api_client(make_settings(url)) as api:
        assert (await api.get("/health")).status_code == 200
        rows = (await api.get("/prices", params={"ticker": "btc_usd"})).json()
    assert [row["ts"] for row in rows] == [100]
    assert path.exists()
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("db.sqlite")) == []


async def test_head_is_answered_on_every_get_route(engine: AsyncEngine, db_url: str) -> None:
    await store(engine, (100, "1.5"))
    async with api_client(make_settings(db_url, tickers="btc_usd")) as api:
        for path in (
            "/health",
            "/livez",
            "/prices?ticker=btc_usd",
            "/prices/latest?ticker=btc_usd",
            "/tickers",
        ):
            get, head = await api.get(path), await api.head(path)
            assert head.status_code == get.status_code == 200, path
            assert head.content == b"", path
            assert head.headers["content-type"] == get.headers["content-type"], path


@pytest.mark.usefixtures("restore_logging")
def test_control_characters_are_escaped_in_text_logs(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "text")
    logging.getLogger("crypto_client.test").info("request %s", "/prices\x1b[2J\x07")
    import structlog

    structlog.get_logger("crypto_client.test").info("request", path="/x\x1b]0;owned\x07\r\n")
    err = capsys.readouterr().err
    assert "\x1b" not in err
    assert "\x07" not in err
    assert "\\x1b" in err
    assert err.count("\n") == 2  # the CR LF inside the value did not start a line


async def test_cursors_take_ascii_digits_only(engine: AsyncEngine, db_url: str) -> None:
    arabic_indic_17 = "\u0661\u0667"
    cursor = base64.urlsafe_b64encode(f"ts:{arabic_indic_17}".encode()).decode().rstrip("=")
    async with api_client(make_settings(db_url)) as api:
        response = await api.get("/prices", params={"ticker": "btc_usd", "cursor": cursor})
    assert response.status_code == 422
    assert "cursor" in response.json()["detail"]


async def test_a_trailing_slash_is_not_redirected_to_the_requests_host(db_url: str) -> None:
    async with api_client(make_settings(db_url)) as api:
        response = await api.get("/prices/?ticker=btc_usd", headers={"Host": "evil.example"})
    assert response.status_code == 404
    assert "evil.example" not in response.headers.get("location", "")


async def test_health_fails_when_the_role_cannot_read_the_prices(postgresql_url: str) -> None:
    admin = await asyncpg.connect(plain_dsn(postgresql_url))
    role = "cc_no_select"
    try:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        url = postgresql_url.replace("postgres@", f"{role}@", 1)
        async with api_client(make_settings(url)) as api:
            response = await api.get("/health")
        assert response.status_code == 503
        assert "permission denied" in response.json()["database"]
    finally:
        await admin.execute(f"DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_latest_asks_the_database_once_per_expiry_whatever_the_concurrency(
    engine: AsyncEngine, db_url: str
) -> None:
    await store(engine, (100, "1.5"))
    async with api_client(make_settings(db_url, api_latest_cache_seconds=5)) as api:
        read_engine: AsyncEngine = api._transport.app.state.read_database.engine  # type: ignore[attr-defined]
        queries: list[str] = []

        def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            if "ORDER BY price_ticks.ts DESC" in statement:
                queries.append(statement)

        event.listen(read_engine.sync_engine, "before_cursor_execute", count)
        answers = await asyncio.gather(*(api.get("/prices/latest?ticker=btc_usd") for _ in range(50)))
    assert {answer.status_code for answer in answers} == {200}
    assert len(queries) == 1


@pytest.fixture
async def locked_prices(postgresql_url: str) -> asyncpg.Connection:
    """A connection holding an exclusive lock on price_ticks: every read waits behind it."""
    connection = await asyncpg.connect(plain_dsn(postgresql_url))
    transaction = connection.transaction()
    await transaction.start()
    await connection.execute("LOCK TABLE price_ticks IN ACCESS EXCLUSIVE MODE")
    yield connection
    await transaction.rollback()
    await connection.close()


async def api_queries_running(postgresql_url: str) -> int:
    connection = await asyncpg.connect(plain_dsn(postgresql_url))
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'crypto-client-api'"
            " AND state = 'active' AND datname = current_database()"
        )
        return count
    finally:
        await connection.close()


async def test_a_runaway_query_is_a_503_after_the_statement_timeout(
    postgresql_url: str, locked_prices: asyncpg.Connection, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": postgresql_url, "API_STATEMENT_TIMEOUT_SECONDS": "0.5", "LOG_FORMAT": "json"}
    with await asyncio.to_thread(ApiServer.command, "api", env, tmp_path) as server:
        started = time.monotonic()
        response = await asyncio.to_thread(server.get, "/prices", ticker="btc_usd")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert "API_STATEMENT_TIMEOUT_SECONDS" in response.json()["detail"]
    assert elapsed < 3
    assert "Traceback" not in server.output


async def test_a_departed_clients_query_is_cancelled(
    postgresql_url: str, locked_prices: asyncpg.Connection, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": postgresql_url, "API_STATEMENT_TIMEOUT_SECONDS": "30"}
    with await asyncio.to_thread(ApiServer.command, "api", env, tmp_path) as server:
        async with local_http.async_client(base_url=server.url, timeout=1.5) as client:
            requests = asyncio.gather(
                *(client.get("/prices", params={"ticker": "btc_usd"}) for _ in range(20)),
                return_exceptions=True,
            )

            async def waiting_behind_the_lock() -> bool:
                return await api_queries_running(postgresql_url) >= 5

            await wait_until_async(waiting_behind_the_lock, 5, what="the queries to reach the database")
            results = await requests
        assert all(isinstance(result, httpx.TimeoutException) for result in results)

        # The lock is still held, and the statement timeout (30 s) is far: only cancellation can
        # end those queries.
        async def none_running() -> bool:
            return await api_queries_running(postgresql_url) == 0

        await wait_until_async(none_running, 10, what="the departed clients' queries to be cancelled")
        async with local_http.async_client(base_url=server.url, timeout=5) as client:
            light = await client.get("/livez")
    assert light.status_code == 200
