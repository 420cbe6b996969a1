"""Schemathesis against the API's own OpenAPI document, over HTTP to a real server process
that requires API keys (every call sends one): no input may cause a 5xx, and every answer must
match what the document promises."""

import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok

from crypto_client.db.engine import create_engine
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice
from tests.support import launcher, local_http
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import ApiServer, crypto_client
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

# Per operation. The suite's default keeps it a check of every operation within the suite's
# time; `make fuzz` searches deeper (FUZZ_EXAMPLES=500).
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
async def fuzz_database() -> AsyncIterator[str]:
    url = await create_pg_database()
    engine = create_engine(url)
    async with engine.begin() as connection:
        await PriceWriter(connection).insert_many(
            [
                NewPrice(t, Decimal("43521.37"), ts)
                for t in ("btc_usd", "eth_usd")
                for ts in range(0, 3000, 60)
            ]
        )
        # The configured ticker has a fresh price, so /readyz answers 200 while the fuzz runs.
        await PriceWriter(connection).insert_many([NewPrice("sol_usdc", Decimal("98.5"), int(time.time()))])
    await engine.dispose()
    yield url
    await drop_pg_database(url)


@pytest.fixture(scope="module")
def key_headers(fuzz_database: str) -> dict[str, str]:
    created = launcher.run(
        crypto_client("keys", "create", "fuzz"),
        env={"DATABASE_URL": fuzz_database, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return {"Authorization": f"Bearer {created.stdout.strip()}"}


@pytest.fixture(scope="module")
def api_url(
    fuzz_database: str, key_headers: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = {
        "DATABASE_URL": fuzz_database,
        "LOG_LEVEL": "WARNING",
        "TICKERS": "sol_usdc",
        # /readyz stays 200 however long the fuzz takes: its one price never goes stale.
        "STALE_AFTER_SECONDS": "86400",
        "API_KEYS_REQUIRED": "true",
        "API_RATE_LIMIT_STORAGE_URL": "memory://",
    }
    server = ApiServer.command("api", env, tmp_path_factory.mktemp("fuzz"))
    try:
        wait_until(lambda: server.get("/health").status_code == 200, 30, what="API health")
        yield server.url
    finally:
        server.stop()
        assert "Traceback" not in server.output, server.output


@pytest.mark.long
def test_no_input_breaks_the_api(api_url: str, key_headers: dict[str, str]) -> None:
    # Schema-valid input may still be refused with a 422: a cursor is opaque (only the API's
    # own are valid) and from_ts <= to_ts spans two fields; no schema can say either.
    config = SchemathesisConfig.from_dict(
        {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "404", "422"]}}}
    )
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json", config=config)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    assert len(operations) == 16
    for operation in operations:  # without the key, only the open paths answer
        keyless = local_http.get(f"{api_url}{operation.path}", timeout=10)
        expected = {200, 503} if operation.path in {"/health", "/livez", "/readyz"} else {401}
        assert keyless.status_code in expected, (operation.path, keyless.status_code)

    for operation in operations:
        if operation.path == "/prices/stream":
            continue  # never ends by itself: fuzzed apart below

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            case.call_and_validate(
                base_url=api_url, headers=key_headers, additional_checks=[not_a_server_error]
            )

        call()


def test_no_input_breaks_the_stream(api_url: str, key_headers: dict[str, str]) -> None:
    """The stream's parameters and `Last-Event-ID`, generated from the document: a 200 is an
    event stream (closed at once), anything else a 4xx with a message."""
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    operation = next(each for each in operations if each.path == "/prices/stream")

    @given(case=operation.as_strategy())
    @settings(max_examples=FUZZ_EXAMPLES // 3, deadline=None, suppress_health_check=list(HealthCheck))
    def call(case: Any) -> None:
        request = case.as_transport_kwargs(base_url=api_url, headers=key_headers)
        with local_http.stream(
            "GET", request["url"], params=request.get("params"), headers=request.get("headers"), timeout=10
        ) as response:
            if response.status_code == 200:
                assert response.headers["content-type"].startswith("text/event-stream")
                return
            response.read()
            assert 400 <= response.status_code < 500, (request, response.status_code, response.text)
            assert isinstance(response.json()["detail"], str)

    call()


async def test_hand_written_nasty_inputs(api_url: str, key_headers: dict[str, str]) -> None:
    nasty = [
        "/prices?ticker=btc%00usd",
        "/prices?ticker=%F0%9F%92%A9",
        "/prices?ticker=btc_usd'%3B%20DROP%20TABLE%20price_ticks%3B--",
        "/prices/latest?ticker=btc_usd%27%20OR%20%271%27%3D%271",
        "/prices?ticker=btc_usd&limit=-1",
        "/prices?ticker=btc_usd&limit=1e3",
        "/prices?ticker=btc_usd&offset=99999999999999999999999999999",
        "/prices/range?ticker=btc_usd&from_ts=9223372036854775808",
        "/prices/range?ticker=btc_usd&to_ts=-9223372036854775809",
        "/prices/range?ticker=btc_usd&from_ts=NaN",
        "/prices?ticker=btc_usd&ticker=btc_usd",
        "/prices?ticker=btc_usd&unknown=1",
        "/prices?ticker=" + "a" * 5000,
        "/prices?ticker=btc_usd&cursor=" + "A" * 60,
        "/prices?ticker=%ff%fe",
        "/prices",
    ]
    async with local_http.async_client(base_url=api_url, headers=key_headers) as client:
        for path in nasty:
            response = await client.get(path)
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
            assert isinstance(response.json()["detail"], str), path
        # Nothing above changed the data.
        rows = (await client.get("/prices?ticker=btc_usd&limit=10000")).json()
        assert len(rows) == 50
        assert {row["price"] for row in rows} == {43521.37}


def test_oversized_request_line_is_refused_by_the_server(api_url: str) -> None:
    """A URL far beyond any real one (1 MB) is refused by the server (granian) with a 431
    before the app sees it; the server stays up."""
    host, port = api_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"GET /prices?ticker=" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 431")
    assert local_http.get(f"{api_url}/health").status_code == 200
