"""The client's parser pinned to the real API's shapes (payloads from the fact sheet)."""

import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from crypto_client import __version__
from crypto_client.clients.deribit.errors import (
    PermanentDeribitError,
    RateLimitedError,
    RetriesExhaustedError,
)
from crypto_client.clients.deribit.http import DeribitHttpClient

BASE = "https://www.deribit.com/api/v2"
FIXTURES = Path(__file__).parent / "fixtures" / "deribit"
REAL_SUCCESS = (FIXTURES / "get_index_price.json").read_bytes()
REAL_REORDERED = (FIXTURES / "get_index_price_reordered.json").read_bytes()
REAL_ERROR = (FIXTURES / "error_invalid_token.json").read_bytes()
TOO_MANY_REQUESTS = (FIXTURES / "error_too_many_requests.json").read_bytes()


def replaying(*answers: tuple[int, bytes, dict[str, str]]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status, body, headers = answers[min(len(seen), len(answers)) - 1]
        return httpx.Response(status, content=body, headers=headers)

    return httpx.MockTransport(handle), seen


def deribit(transport: httpx.MockTransport) -> DeribitHttpClient:
    return DeribitHttpClient(BASE, max_retries=2, backoff_seconds=0.001, transport=transport)


async def test_real_success_payload() -> None:
    transport, seen = replaying((200, REAL_SUCCESS, {}))
    async with deribit(transport) as client:
        price = await client.get_index_price("btc_usd")
    assert price.price == Decimal("11628.81")
    assert str(price.price) == "11628.81"
    assert price.server_time_us == 1597678000000137
    request = seen[0]
    assert str(request.url) == f"{BASE}/public/get_index_price?index_name=btc_usd"
    assert request.headers["user-agent"] == f"crypto-client/{__version__}"


async def test_key_order_and_string_times_do_not_matter() -> None:
    transport, _ = replaying((200, REAL_REORDERED, {}))
    async with deribit(transport) as client:
        price = await client.get_index_price("eth_usd")
    assert price.price == Decimal("2291.4")
    assert price.server_time_us == 1597678000000137


@pytest.mark.parametrize("status", [200, 400])
async def test_json_rpc_error_decides_whatever_the_status(status: int) -> None:
    transport, seen = replaying((status, REAL_ERROR, {}))
    async with deribit(transport) as client:
        with pytest.raises(PermanentDeribitError) as error:
            await client.get_index_price("btc_usd")
    assert error.value.code == 13009
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, TOO_MANY_REQUESTS),
        (429, b"Too Many Requests"),
    ],
    ids=["400-10028", "bare-429"],
)
async def test_rate_limits_in_both_forms_are_retried(status: int, body: bytes) -> None:
    transport, seen = replaying((status, body, {}), (200, REAL_SUCCESS, {}))
    async with deribit(transport) as client:
        price = await client.get_index_price("btc_usd")
    assert price.price == Decimal("11628.81")
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (502, b"<html><body>Bad Gateway</body></html>"),
        (200, b'{"jsonrpc":"2.0","result":{"estimated_delivery_price":1},"usOut":1}'),
        (200, b'{"jsonrpc":"2.0","result":{"index_price":NaN,"estimated_delivery_price":1}}'),
        (200, b'{"jsonrpc":"2.0","result":{"index_price":true,"estimated_delivery_price":1}}'),
        (200, b'{"jsonrpc":"2.0","result":{"index_price":"11628.81","estimated_delivery_price":1}}'),
        (200, b'{"jsonrpc":"2.0","result":{"index_price":-1,"estimated_delivery_price":1}}'),
        (200, b"not json"),
        (200, b'{"result":{"index_price":1,"estimated_delivery_price":1}}'),
        (503, b'{"jsonrpc":"2.0","error":{"code":11051,"message":"system_maintenance"}}'),
    ],
    ids=[
        "html-502",
        "missing-price",
        "nan",
        "boolean-price",
        "string-price",
        "negative",
        "not-json",
        "no-jsonrpc",
        "maintenance",
    ],
)
async def test_garbage_is_transient_and_retried_then_reported(status: int, body: bytes) -> None:
    transport, seen = replaying((status, body, {}))
    async with deribit(transport) as client:
        with pytest.raises(RetriesExhaustedError):
            await client.get_index_price("btc_usd")
    assert len(seen) == 3


async def test_an_odd_estimated_delivery_price_does_not_fail_a_good_index_price() -> None:
    # Only index_price is stored; estimated_delivery_price missing or odd must not cost the price.
    odd = b'{"jsonrpc":"2.0","result":{"index_price":11628.81,"estimated_delivery_price":"n/a"},"usOut":1}'
    missing = b'{"jsonrpc":"2.0","result":{"index_price":11628.81},"usOut":1}'
    for body in (odd, missing):
        transport, seen = replaying((200, body, {}))
        async with deribit(transport) as client:
            observation = await client.get_index_price("btc_usd")
        assert observation.price == Decimal("11628.81")
        assert len(seen) == 1


async def test_retry_after_header_is_honoured() -> None:
    transport, _ = replaying((429, b"", {"Retry-After": "0.2"}), (200, REAL_SUCCESS, {}))
    async with deribit(transport) as client:
        started = time.monotonic()
        await client.get_index_price("btc_usd")
    assert time.monotonic() - started >= 0.2


async def test_rate_limited_error_type() -> None:
    transport, _ = replaying((429, b"", {}))
    async with deribit(transport) as client:
        with pytest.raises(RetriesExhaustedError) as error:
            await client.get_index_price("btc_usd")
    assert isinstance(error.value.last_error, RateLimitedError)
