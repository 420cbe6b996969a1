"""The client against the simulator over real HTTP."""

import asyncio
import time
from decimal import Decimal

import pytest

from crypto_client.clients.deribit.errors import (
    PermanentDeribitError,
    RateLimitedError,
    RetriesExhaustedError,
)
from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.clients.source import DeadlinePassedError
from tests.support.services import SimServer

MAX_RETRIES = 3


def client(sim: SimServer, **options: object) -> DeribitHttpClient:
    defaults: dict[str, object] = {"timeout": 0.5, "max_retries": MAX_RETRIES, "backoff_seconds": 0.01}
    return DeribitHttpClient(sim.rpc_url, **{**defaults, **options})  # type: ignore[arg-type]


async def test_index_prices_of_several_indexes(sim: SimServer) -> None:
    async with client(sim) as deribit:
        for name in ("btc_usd", "eth_usd", "sol_usdc", "drbfix-btc_usdc", "shib_usdc"):
            price = await deribit.get_index_price(name)
            assert price.ticker == name
            assert price.sent_at <= price.received_at
            assert isinstance(price.price, Decimal)
            assert price.price > 0
            assert price.server_time_us is not None
            assert abs(price.server_time_us / 1e6 - time.time()) < 60


@pytest.mark.parametrize("text", ["43521.37", "0.00012345", "1234567.89012345", "2291.40"])
async def test_prices_stay_exact(sim: SimServer, text: str) -> None:
    sim.pin(btc_usd=text)
    async with client(sim) as deribit:
        price = await deribit.get_index_price("btc_usd")
    assert str(price.price) == text


@pytest.mark.parametrize("kind", ["error", "timeout", "drop", "malformed", "bad_result", "rate_limit"])
async def test_transient_faults_are_retried_until_they_pass(sim: SimServer, kind: str) -> None:
    sim.faults("btc_usd", fail_next=2, fail_next_kind=kind)
    async with client(sim) as deribit:
        price = await deribit.get_index_price("btc_usd")
    assert price.price > 0
    assert sim.requests_for("btc_usd") == 3


async def test_retries_exhausted_is_a_typed_error(sim: SimServer) -> None:
    sim.faults("btc_usd", outage=True)
    async with client(sim) as deribit:
        with pytest.raises(RetriesExhaustedError) as error:
            await deribit.get_index_price("btc_usd")
    assert error.value.attempts == MAX_RETRIES + 1
    assert sim.requests_for("btc_usd") == MAX_RETRIES + 1
    assert "503" in str(error.value.last_error)


async def test_unknown_index_is_permanent_and_not_retried(sim: SimServer) -> None:
    async with client(sim) as deribit:
        with pytest.raises(PermanentDeribitError) as error:
            await deribit.get_index_price("no_such_index")
    assert error.value.code == -32602
    assert error.value.http_status == 400
    assert sim.requests_for("no_such_index") == 1


async def test_rate_limit_waits_as_told(sim: SimServer) -> None:
    sim.faults("btc_usd", fail_next=1, fail_next_kind="rate_limit", retry_after_seconds=0.4)
    async with client(sim) as deribit:
        started = time.monotonic()
        await deribit.get_index_price("btc_usd")
    assert time.monotonic() - started >= 0.4
    assert sim.requests_for("btc_usd") == 2


async def test_rate_limit_backs_off_exponentially(sim: SimServer) -> None:
    sim.faults("btc_usd", rate_limit_rate=1.0)
    async with client(sim, backoff_seconds=0.05, max_retries=3) as deribit:
        started = time.monotonic()
        with pytest.raises(RetriesExhaustedError) as error:
            await deribit.get_index_price("btc_usd")
    # At least 0.05 + 0.1 + 0.2 s between the four attempts: it never hammers.
    assert time.monotonic() - started >= 0.35
    assert isinstance(error.value.last_error, RateLimitedError)
    assert sim.requests_for("btc_usd") == 4


async def test_concurrency_is_real_and_bounded(sim: SimServer) -> None:
    sim.faults(latency_ms=200)
    tickers = ["btc_usd", "eth_usd", "sol_usdc", "xrp_usdc", "ada_usdc", "dot_usdc", "ltc_usdc", "bnb_usdc"]
    async with client(sim, max_concurrency=4, timeout=5) as deribit:
        results = await deribit.fetch_prices(tickers)
    assert [result.ticker for result in results] == tickers
    assert all(result.observation is not None for result in results)
    # Four at once, never more: two waves of four, not eight requests one after another.
    assert sim.stats()["max_in_flight"] == 4


async def test_fetch_prices_keeps_the_others_when_one_fails(sim: SimServer) -> None:
    sim.faults("eth_usd", outage=True)
    async with client(sim) as deribit:
        results = await deribit.fetch_prices(["btc_usd", "eth_usd", "no_such_index", "sol_usdc"])
    by_ticker = {result.ticker: result for result in results}
    assert by_ticker["btc_usd"].observation is not None
    assert by_ticker["sol_usdc"].observation is not None
    assert isinstance(by_ticker["eth_usd"].error, RetriesExhaustedError)
    assert isinstance(by_ticker["no_such_index"].error, PermanentDeribitError)


async def test_what_is_unanswered_at_the_deadline_is_not_waited_for(sim: SimServer) -> None:
    sim.faults("eth_usd", latency_ms=5000)  # slower than the deadline
    sim.faults("sol_usdc", outage=True)  # retried, with backoff, past the deadline
    async with client(sim, timeout=10, max_retries=100, backoff_seconds=0.2) as deribit:
        results = await deribit.fetch_prices(["btc_usd", "eth_usd", "sol_usdc"], deadline=time.time() + 1)
    by_ticker = {result.ticker: result for result in results}
    assert by_ticker["btc_usd"].observation is not None
    for ticker in ("eth_usd", "sol_usdc"):
        assert by_ticker[ticker].observation is None
        assert isinstance(by_ticker[ticker].error, DeadlinePassedError), by_ticker[ticker]


async def test_slow_ticker_does_not_delay_the_others(sim: SimServer) -> None:
    sim.faults("eth_usd", latency_ms=400)
    async with client(sim, timeout=2) as deribit:
        fast = asyncio.create_task(deribit.get_index_price("btc_usd"))
        slow = asyncio.create_task(deribit.get_index_price("eth_usd"))
        done, _ = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {fast}
        await slow
