"""Deribit's cap of 32 connections per IP, shared by every process of a host through Redis."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crypto_client.clients.deribit.budget import SharedConnectionBudget, budget_key
from crypto_client.clients.deribit.errors import TransientDeribitError
from crypto_client.clients.deribit.ws import DeribitStream
from crypto_client.clients.source import Observation
from tests.support import launcher
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import SimServer, ThrowawayRedis, crypto_client
from tests.support.slots import roomy_slot
from tests.support.waiting import wait_until_async

TICKERS = "btc_usd,eth_usd,sol_usdc,xrp_usdc,ada_usdc,doge_usdc,ltc_usdc,link_usdc"


@pytest.mark.long
@pytest.mark.slow
async def test_eight_ingest_processes_stay_within_one_budget(
    tmp_path: Path, redis_server: ThrowawayRedis
) -> None:
    # Slow answers make the 8 x 8 requests overlap: without a shared budget the simulator
    # would see 32 connections at once and refuse the rest.
    sim = SimServer(tmp_path, 0, "--max-connections", "32", "--latency-ms", "3000")
    database = await create_pg_database()
    try:
        migrate = launcher.run(
            crypto_client("migrate"), env={**os.environ, "DATABASE_URL": database}, capture_output=True
        )
        assert migrate.returncode == 0, migrate.stderr
        env = {
            **os.environ,
            "DATABASE_URL": database,
            "CELERY_BROKER_URL": redis_server.url,
            "DERIBIT_RPC_URL": sim.rpc_url,
            "DERIBIT_TIMEOUT_SECONDS": "10",
            "DERIBIT_RETRY_BACKOFF_SECONDS": "0.2",
            "TICKERS": TICKERS,
            # Day-long slots: every process's tick falls in the same slot, none is late.
            "INGEST_INTERVAL_SECONDS": "86400",
        }
        await roomy_slot(86400, room=120)
        processes = [
            launcher.Popen(crypto_client("ingest"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for _ in range(8)
        ]
        outputs = [process.communicate(timeout=180)[0].decode() for process in processes]
        for process, output in zip(processes, outputs, strict=True):
            assert process.returncode == 0, output
        stats = sim.stats()
        assert stats["refused_connections"] == 0
        # The budget (24) leaves Deribit's cap (32) room for connections a client has closed
        # and the server has not yet seen close, which a loaded machine makes visible.
        assert stats["max_connections_open"] <= 32
        assert sum(stats["requests"].values()) >= 64
    finally:
        sim.stop()
        await drop_pg_database(database)


_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from contextlib import AsyncExitStack
    from crypto_client.clients.deribit.budget import SharedConnectionBudget, budget_key

    async def main() -> None:
        budget = SharedConnectionBudget(sys.argv[1], "https://deribit.example", 4, lease_seconds=2)
        async with AsyncExitStack() as stack:
            for _ in range(3):
                await stack.enter_async_context(budget.lease(wait_seconds=5))
            print("held", flush=True)
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


async def test_a_killed_holders_leases_come_back(redis_server: ThrowawayRedis) -> None:
    budget = SharedConnectionBudget(redis_server.url, "https://deribit.example", 4, lease_seconds=2)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, redis_server.url], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert (await asyncio.to_thread(holder.stdout.readline)).strip() == b"held"
        # A live holder keeps its leases past their first expiry: they are renewed.
        for _ in range(15):
            assert await budget.held() == 3
            await asyncio.sleep(0.2)
        async with budget.lease(wait_seconds=1):
            assert await budget.held() == 4
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        await wait_until_async(lambda: _none_held(budget), 10, what="the dead holder's leases to expire")
        async with budget.lease(wait_seconds=1), budget.lease(wait_seconds=1):
            assert await budget.held() == 2
    finally:
        holder.kill()
        holder.wait(10)
        await budget.aclose()


async def _none_held(budget: SharedConnectionBudget) -> bool:
    return await budget.held() == 0


async def test_a_full_budget_refuses_after_the_wait(redis_server: ThrowawayRedis) -> None:
    budget = SharedConnectionBudget(redis_server.url, "https://deribit.example", 1)
    try:
        async with budget.lease(wait_seconds=1):
            with pytest.raises(TransientDeribitError, match="DERIBIT_MAX_CONNECTIONS"):
                async with budget.lease(wait_seconds=0.3):
                    pass
        assert await budget.held() == 0
    finally:
        await budget.aclose()


async def test_the_websocket_holds_a_lease_while_connected(
    sim: SimServer, redis_server: ThrowawayRedis
) -> None:
    budget = SharedConnectionBudget(redis_server.url, sim.ws_url, 24)
    stream = DeribitStream(sim.ws_url, budget=budget)

    async def ignore(_observation: Observation) -> None:
        return None

    running = asyncio.create_task(stream.run(["btc_usd"], ignore))
    try:
        await asyncio.wait_for(stream.connected.wait(), 20)
        assert await budget.held() == 1
        # The HTTP client of the same endpoint shares the budget.
        assert budget.key == budget_key(sim.rpc_url)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert await budget.held() == 0
    await budget.aclose()
