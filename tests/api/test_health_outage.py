"""/health and the API when PostgreSQL is unreachable, stopped and back."""

import socket
import time

import httpx

from tests.support.api import api_client
from tests.support.databases import create_pg_database
from tests.support.services import ThrowawayPostgres, free_port
from tests.support.settings import make_settings


async def unhealthy_within_a_second(client: httpx.AsyncClient) -> str:
    """Asserts /health says 503 in about a second; returns what it says failed."""
    started = time.monotonic()
    response = await client.get("/health")
    assert time.monotonic() - started < 1.5
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    problem: str = body["database"]
    assert problem
    return problem


async def test_wrong_port_is_503_within_a_second() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    async with api_client(make_settings(url)) as client:
        await unhealthy_within_a_second(client)
        prices = await client.get("/prices/latest", params={"ticker": "btc_usd"})
        assert prices.status_code == 503
        assert "database" in prices.json()["detail"]


async def test_unresponsive_database_still_answers_within_a_second() -> None:
    # A listening socket that never speaks PostgreSQL: connect succeeds, the handshake hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/postgres"
        async with api_client(make_settings(url)) as client:
            assert "within" in await unhealthy_within_a_second(client)


async def test_stopped_database_then_back_without_restarting_the_api(throwaway_pg: ThrowawayPostgres) -> None:
    url = await create_pg_database(throwaway_pg.url)
    async with api_client(make_settings(url)) as client:
        assert (await client.get("/health")).status_code == 200
        throwaway_pg.stop()
        await unhealthy_within_a_second(client)
        throwaway_pg.start()
        assert (await client.get("/health")).status_code == 200


async def test_a_database_without_the_schema_is_unhealthy(throwaway_pg: ThrowawayPostgres) -> None:
    async with api_client(make_settings(throwaway_pg.url)) as client:  # never migrated
        assert "price_ticks" in await unhealthy_within_a_second(client)
