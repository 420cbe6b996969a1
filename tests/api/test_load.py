"""A bounded load on loopback while ingestion writes: no error, no non-2xx answer."""

import asyncio
from pathlib import Path

import pytest

from bench.load import load
from crypto_client.db.engine import create_engine
from tests.support import local_http
from tests.support.databases import empty_database, stored_rows
from tests.support.services import ApiServer, SimServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

LOAD_SECONDS = 8
CONNECTIONS = 64


async def test_api_under_load_while_ingesting(sim: SimServer, postgresql_url: str, tmp_path: Path) -> None:
    await empty_database(postgresql_url)
    engine = create_engine(postgresql_url)
    env = {
        "DATABASE_URL": postgresql_url,
        "DERIBIT_RPC_URL": sim.rpc_url,
        "INGEST_INTERVAL_SECONDS": "1",
        "LOG_LEVEL": "WARNING",
    }
    server = await asyncio.to_thread(ApiServer.command, "serve", env, tmp_path)
    base = server.url
    try:
        await asyncio.to_thread(
            wait_until, lambda: local_http.get(f"{base}/prices/latest?ticker=btc_usd").status_code == 200, 30
        )
        before = len(await stored_rows(engine, "btc_usd"))
        pages, latest = await asyncio.gather(
            asyncio.to_thread(
                load, f"{base}/prices?ticker=btc_usd&limit=100", LOAD_SECONDS, CONNECTIONS // 2
            ),
            asyncio.to_thread(load, f"{base}/prices/latest?ticker=eth_usd", LOAD_SECONDS, CONNECTIONS // 2),
        )
        after = len(await stored_rows(engine, "btc_usd"))
    finally:
        server.stop()
        await engine.dispose()
    for result in (pages, latest):
        assert result.non_2xx == 0
        assert result.errors == 0
        assert result.rps > 0
    assert after >= before + LOAD_SECONDS // 2, "ingestion stalled under load"
    assert "Traceback" not in server.output
