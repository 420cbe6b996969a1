"""What counts as "the database is unavailable" (wait and retry, keep the rows) rather than
"the database refused the row" (the row fails): the answers of real servers."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from crypto_client.db.engine import is_database_unavailable
from crypto_client.setting_values import async_url
from tests.support.services import ThrowawayPostgres

pytestmark = pytest.mark.slow


async def test_a_server_not_yet_accepting_connections_is_unavailable(throwaway_pg: ThrowawayPostgres) -> None:
    """A server still starting up answers every connection with SQLSTATE 57P03, which asyncpg
    raises as a plain DBAPIError: a write held through an outage must keep waiting then."""
    standby = throwaway_pg.replica()
    try:
        standby.stop()
        standby.start("hot_standby=off")  # in recovery for good: "not accepting connections", 57P03
        engine = create_async_engine(async_url(standby.url))
        try:
            with pytest.raises(DBAPIError) as raised:
                async with engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
        finally:
            await engine.dispose()
    finally:
        standby.destroy()
    assert getattr(raised.value.orig, "sqlstate", None) == "57P03", raised.value
    assert is_database_unavailable(raised.value)


async def test_a_refused_row_is_not_unavailability(postgresql_url: str) -> None:
    engine = create_async_engine(async_url(postgresql_url))
    try:
        with pytest.raises(DBAPIError) as raised:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1 / 0"))
    finally:
        await engine.dispose()
    assert not is_database_unavailable(raised.value)
