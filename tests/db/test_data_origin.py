"""Simulated prices never share a database with real ones: the demo's own file, the origin
recorded at the first write, and writers of another origin refused at start and at the write."""

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from decimal import Decimal
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.origins import StoredOrigins, WriterOrigin, declare_origin, stored_origins
from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice
from crypto_client.origin import SIMULATOR_HEADER, origin_of
from tests.support import launcher, local_http
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import ApiServer, SimServer, crypto_client, free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

REAL_DERIBIT = "https://www.deribit.com/api/v2"


def test_origin_is_the_host_with_deribits_aliases_as_one() -> None:
    assert origin_of(REAL_DERIBIT, simulator=False) == "www.deribit.com"
    assert origin_of("https://drb.coinbase.com/api/v2", simulator=False) == "www.deribit.com"
    assert origin_of("wss://www.deribit.com/ws/api/v2", simulator=False) == "www.deribit.com"
    assert origin_of("https://test.deribit.com/api/v2", simulator=False) == "test.deribit.com"
    assert origin_of("http://127.0.0.1:8001/api/v2", simulator=False) == "127.0.0.1:8001"
    assert origin_of("http://127.0.0.1:8001/api/v2", simulator=True) == "simulator"


class Lookalike:
    """A Deribit look-alike on its own port: it forwards to the simulator but does not say it
    is the simulator (as a real server would not), so its prices have origin 127.0.0.1:port.
    While `down`, it answers 503."""

    def __init__(self, sim: SimServer) -> None:
        self.down = False
        self.port = free_port()
        self.rpc_url = f"http://127.0.0.1:{self.port}/api/v2"
        self.origin = f"127.0.0.1:{self.port}"

        async def forward(request: Request) -> Response:
            if self.down:
                return Response("down", status_code=503)
            async with local_http.async_client() as client:
                answer = await client.get(
                    f"{sim.rpc_url}/public/{request.path_params['method']}", params=request.query_params
                )
            assert SIMULATOR_HEADER in answer.headers
            return Response(answer.content, answer.status_code, media_type="application/json")

        app = Starlette(routes=[Route("/api/v2/public/{method:str}", forward)])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_until(lambda: self._server.started, 10, what="look-alike server")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture
def lookalike(sim: SimServer) -> Iterator[Lookalike]:
    server = Lookalike(sim)
    yield server
    server.stop()


@pytest.fixture(params=["postgresql", "sqlite"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A new, migrated, empty database of each backend."""
    if request.param == "postgresql":
        url = await create_pg_database()
        yield url
        await drop_pg_database(url)
    else:
        url = f"sqlite:///{tmp_path / 'prices.db'}"
        await asyncio.to_thread(migrations.upgrade, url)
        yield url


def env_for(database: str, rpc_url: str, **more: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database,
        "POSTGRES_HOST": "",
        "DERIBIT_RPC_URL": rpc_url,
        "DERIBIT_MAX_RETRIES": "0",
        "DERIBIT_TIMEOUT_SECONDS": "2",
        "TICKERS": "btc_usd",
        "LOG_FORMAT": "json",
        **more,
    }


def run(env: Mapping[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # A one-minute slot with room left, so that the tick is never `late` at a slot's end.
    if 60 - time.time() % 60 < 10:
        time.sleep(60 - time.time() % 60)
    return launcher.run(
        crypto_client(*args), env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=cwd
    )


def origins(database: str) -> StoredOrigins:
    async def read() -> StoredOrigins:
        engine = create_engine(database)
        try:
            return await stored_origins(engine)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def row_count(database: str) -> int:
    import sqlalchemy as sa

    async def count() -> int:
        engine = create_engine(database)
        try:
            async with engine.connect() as connection:
                return int(
                    (await connection.execute(sa.text("SELECT count(*) FROM price_ticks"))).scalar_one()
                )
        finally:
            await engine.dispose()

    return asyncio.run(count())


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused runner ends with."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("crypto-client:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_demo_writes_its_own_file_and_records_the_simulator(tmp_path: Path) -> None:
    port = free_port()
    args = ["env", "-C", str(tmp_path), *crypto_client("serve", "--simulate", "--port", str(port))]
    env = {"DATABASE_URL": "", "POSTGRES_HOST": "", "INGEST_INTERVAL_SECONDS": "1", "TICKERS": "btc_usd"}
    with ApiServer(args, env, tmp_path / "demo.log", port=port, ready_path="/health") as server:
        health = wait_until(
            lambda: (body := server.get("/health").json())["data_origin"] and body, 20, what="an origin"
        )
    assert health["data_origin"] == "simulator"
    assert (tmp_path / "crypto-client-demo.db").exists()
    assert not (tmp_path / "crypto-client.db").exists()
    # A real `serve` on the demo's file (named explicitly) is refused in one line.
    demo = f"sqlite:///{tmp_path / 'crypto-client-demo.db'}"
    line = refusal(run(env_for(demo, REAL_DERIBIT), "serve", "--port", str(free_port())))
    assert "holds prices from 'simulator'" in line
    assert "origin is 'www.deribit.com' (DERIBIT_RPC_URL)" in line
    assert "ALLOW_ORIGIN_CHANGE=true" in line


def test_a_runner_started_before_another_origin_wrote_is_refused_at_the_write(
    database: str, sim: SimServer, lookalike: Lookalike, tmp_path: Path
) -> None:
    lookalike.down = True  # A starts on an empty database: nothing to refuse yet
    env = env_for(database, lookalike.rpc_url, INGEST_INTERVAL_SECONDS="1", BACKFILL_INTERVAL_SECONDS="1")
    with ApiServer.command("serve", env, tmp_path, ready_path="/health") as runner_a:
        wait_until(lambda: '"ticker failed"' in runner_a.output, 20, what="a failed tick of A")
        first = run(env_for(database, sim.rpc_url), "ingest")
        assert first.returncode == 0, first.stdout + first.stderr
        assert origins(database) == StoredOrigins("simulator", [])
        lookalike.down = False
        wait_until(lambda: "holds prices from 'simulator'" in runner_a.output, 20, what="A's refused write")
        wait_until(lambda: sim.requests_for("btc_usd") >= 4, 20, what="A fetching prices")
        assert runner_a.get("/health").json()["data_origin"] == "simulator"
    assert f"this writer's origin is '{lookalike.origin}'" in runner_a.output
    assert row_count(database) == 1  # the simulator's one row; neither A's ticks nor its repair
    assert origins(database) == StoredOrigins("simulator", [])


@pytest.mark.long
def test_a_writer_of_another_origin_is_refused_at_start_unless_overridden(
    database: str, sim: SimServer, lookalike: Lookalike
) -> None:
    assert run(env_for(database, sim.rpc_url), "ingest").returncode == 0
    line = refusal(run(env_for(database, lookalike.rpc_url), "ingest"))
    assert f"holds prices from 'simulator', this writer's origin is '{lookalike.origin}'" in line
    assert row_count(database) == 1

    # Another ticker: the simulator's row already holds this minute's btc_usd slot.
    allowed_env = env_for(database, lookalike.rpc_url, ALLOW_ORIGIN_CHANGE="true", TICKERS="eth_usd")
    allowed = run(allowed_env, "ingest")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "writing prices of another origin: ALLOW_ORIGIN_CHANGE is set" in allowed.stdout + allowed.stderr
    assert row_count(database) == 2
    assert origins(database) == StoredOrigins("simulator", [lookalike.origin])
    # The override is needed every time: recording it admits nothing.
    assert "holds prices from 'simulator'" in refusal(run(env_for(database, lookalike.rpc_url), "ingest"))


async def _write_as_real_deribit(database: str) -> None:
    """A row stored as a writer of origin www.deribit.com stores it (no internet here: the
    source's word is given, the write is the service's own)."""

    class RealDeribit:
        origin = "www.deribit.com"
        answered = True

    engine = create_engine(database)
    try:
        declared = declare_origin(engine, WriterOrigin(RealDeribit(), "DERIBIT_RPC_URL"))
        async with write_transaction(declared) as writer:
            await writer.insert_many([NewPrice("btc_usd", Decimal("1.5"), 100, None)])
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("command", "setting"),
    [
        (["ingest"], "DERIBIT_RPC_URL"),
        (["backfill"], "DERIBIT_RPC_URL"),
        (["serve", "--port", "0"], "DERIBIT_RPC_URL"),
        (["worker"], "DERIBIT_RPC_URL"),
        (["stream"], "DERIBIT_WS_URL"),
    ],
)
def test_every_runner_of_the_simulator_is_refused_on_a_real_database(
    command: list[str], setting: str, sim: SimServer, tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path / 'real.db'}"
    migrations.upgrade(database)
    asyncio.run(_write_as_real_deribit(database))
    if command[0] == "serve":
        command = ["serve", "--port", str(free_port())]
    env = env_for(database, sim.rpc_url, DERIBIT_WS_URL=sim.ws_url)
    line = refusal(run(env, *command))
    assert f"holds prices from 'www.deribit.com', this writer's origin is 'simulator' ({setting})" in line
    assert row_count(database) == 1


def test_testnet_is_another_origin_and_coinbase_is_deribit(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'real.db'}"
    migrations.upgrade(database)
    asyncio.run(_write_as_real_deribit(database))
    testnet = refusal(run(env_for(database, "https://test.deribit.com/api/v2"), "ingest"))
    assert "this writer's origin is 'test.deribit.com'" in testnet
    coinbase = run(env_for(database, "https://drb.coinbase.com/api/v2"), "ingest")
    assert "holds prices from" not in coinbase.stderr  # it only fails to reach the internet


def test_the_stream_records_the_simulator_from_its_handshake(
    database: str, sim: SimServer, tmp_path: Path
) -> None:
    env = env_for(database, REAL_DERIBIT, DERIBIT_WS_URL=sim.ws_url, METRICS_PORT="0")
    process = launcher.Popen(
        crypto_client("stream"),
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: row_count(database) > 0, 30, what="a streamed row")
    finally:
        process.terminate()
        process.wait(10)
    assert origins(database) == StoredOrigins("simulator", [])
