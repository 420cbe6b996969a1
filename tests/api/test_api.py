"""Every endpoint on PostgreSQL and on SQLite, through the ASGI app."""

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.api.schemas import (
    CandleOut,
    CoverageOut,
    ErrorOut,
    HealthOut,
    LatestOut,
    PriceOut,
    ReadinessOut,
    SnapshotOut,
    TickerOut,
    ValidationErrorOut,
)
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice
from tests.support.api import api_client
from tests.support.settings import make_settings


@pytest.fixture
async def api(engine: AsyncEngine, db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(make_settings(db_url, tickers="btc_usd,eth_usd,sol_usdc")) as client:
        yield client


async def store(engine: AsyncEngine, ticker: str, *points: tuple[int, str]) -> None:
    async with engine.begin() as connection:
        await PriceWriter(connection).insert_many(
            [NewPrice(ticker, Decimal(price), ts) for ts, price in points]
        )


async def walk_pages(api: httpx.AsyncClient, url: str) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    pages = 0
    next_url: str | None = url
    while next_url:
        response = await api.get(next_url)
        assert response.status_code == 200, response.text
        rows.extend(response.json())
        pages += 1
        next_url = response.links.get("next", {}).get("url")
    return rows, pages


async def test_prices_oldest_first_as_exact_numbers(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    await store(engine, "btc_usd", (200, "43521.37"), (100, "1234567.89012345"), (300, "0.00012345"))
    await store(engine, "eth_usd", (100, "2291.4"))
    response = await api.get("/prices", params={"ticker": "btc_usd"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "link" not in response.headers
    # The body text carries the decimals exactly, as JSON numbers.
    assert response.text == (
        '[{"ticker":"btc_usd","price":1234567.89012345,"ts":100,"source":"poll"},'
        '{"ticker":"btc_usd","price":43521.37,"ts":200,"source":"poll"},'
        '{"ticker":"btc_usd","price":0.00012345,"ts":300,"source":"poll"}]'
    )


async def test_limit_and_offset(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    await store(engine, "btc_usd", *((ts, "1") for ts in range(1, 11)))
    response = await api.get("/prices", params={"ticker": "btc_usd", "limit": 3, "offset": 4})
    assert [row["ts"] for row in response.json()] == [5, 6, 7]
    assert 'rel="next"' in response.headers["link"]


async def test_link_pages_cover_everything_once(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    await store(engine, "btc_usd", *((ts, str(ts)) for ts in range(1, 26)))
    rows, pages = await walk_pages(api, "/prices?ticker=btc_usd&limit=10")
    assert [row["ts"] for row in rows] == list(range(1, 26))
    assert pages == 3


async def test_exact_multiple_of_limit_has_no_empty_last_page(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await store(engine, "btc_usd", *((ts, "1") for ts in range(1, 21)))
    rows, pages = await walk_pages(api, "/prices?ticker=btc_usd&limit=10")
    assert len(rows) == 20
    assert pages == 2


async def test_range_pages_respect_bounds(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    await store(engine, "btc_usd", *((ts, "1") for ts in range(0, 100)))
    rows, pages = await walk_pages(api, "/prices/range?ticker=btc_usd&from_ts=10&to_ts=44&limit=10")
    assert [row["ts"] for row in rows] == list(range(10, 45))
    assert pages == 4
    last_link = (await api.get("/prices/range?ticker=btc_usd&from_ts=10&to_ts=44&limit=10")).links["next"][
        "url"
    ]
    assert "from_ts=10" in last_link
    assert "to_ts=44" in last_link


async def test_range_bounds_inclusive_and_optional(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    await store(engine, "btc_usd", (10, "1"), (20, "2"), (30, "3"))

    async def ts_of(**params: Any) -> list[int]:
        response = await api.get("/prices/range", params={"ticker": "btc_usd", **params})
        assert response.status_code == 200
        return [row["ts"] for row in response.json()]

    assert await ts_of(from_ts=10, to_ts=20) == [10, 20]
    assert await ts_of(from_ts=20) == [20, 30]
    assert await ts_of(to_ts=10) == [10]
    assert await ts_of() == [10, 20, 30]
    assert await ts_of(from_ts=11, to_ts=19) == []
    assert await ts_of(from_ts=20, to_ts=20) == [20]


async def test_latest(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    missing = await api.get("/prices/latest", params={"ticker": "btc_usd"})
    assert missing.status_code == 404
    assert "btc_usd" in missing.json()["detail"]
    await store(engine, "btc_usd", (100, "1.5"), (300, "43521.37"), (200, "2"))
    response = await api.get("/prices/latest", params={"ticker": "BTC_USD"})
    assert response.status_code == 200
    assert response.text.startswith(
        '{"ticker":"btc_usd","price":43521.37,"ts":300,"source":"poll","age_seconds":'
    )
    assert (
        response.json()["age_seconds"] == int(time.time()) - 300
        or response.json()["age_seconds"] == int(time.time()) - 301
    )


async def test_empty_ticker_gives_empty_lists(api: httpx.AsyncClient) -> None:
    assert (await api.get("/prices", params={"ticker": "eth_usd"})).json() == []
    assert (await api.get("/prices/range", params={"ticker": "eth_usd"})).json() == []


async def test_tickers(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    await store(engine, "btc_usd", (100, "1"), (160, "2"))
    await store(engine, "old_usd", (50, "1"))
    body = (await api.get("/tickers")).json()
    ages = [row.pop("age_seconds") for row in body]
    assert [row.pop("coverage_24h") for row in body] == [None] * 4  # no tick tracked them
    assert body == [
        {"ticker": "btc_usd", "configured": True, "rows": 2, "first_ts": 100, "last_ts": 160},
        {"ticker": "eth_usd", "configured": True, "rows": 0, "first_ts": None, "last_ts": None},
        {"ticker": "old_usd", "configured": False, "rows": 1, "first_ts": 50, "last_ts": 50},
        {"ticker": "sol_usdc", "configured": True, "rows": 0, "first_ts": None, "last_ts": None},
    ]
    assert ages[1] is None
    assert ages[0] is not None
    assert ages[0] in (int(time.time()) - 160, int(time.time()) - 161)


async def test_health_ok(api: httpx.AsyncClient) -> None:
    response = await api.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "data_origin": None,
        "data_origin_overrides": [],
    }


async def test_request_id_is_echoed_or_made(api: httpx.AsyncClient) -> None:
    echoed = await api.get("/health", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    made = await api.get("/health", headers={"X-Request-ID": "bad id with spaces"})
    assert len(made.headers["x-request-id"]) == 32


@pytest.mark.parametrize(
    ("path", "params", "needle"),
    [
        ("/prices", {}, "ticker"),
        ("/prices/latest", {}, "ticker"),
        ("/prices/range", {}, "ticker"),
        ("/prices", {"ticker": "btc usd"}, "ticker"),
        ("/prices", {"ticker": "btc_usd", "limit": 0}, "limit"),
        ("/prices", {"ticker": "btc_usd", "limit": 10001}, "limit"),
        ("/prices", {"ticker": "btc_usd", "limit": "ten"}, "limit"),
        ("/prices", {"ticker": "btc_usd", "offset": -1}, "offset"),
        ("/prices", {"ticker": "btc_usd", "offset": 2**70}, "offset"),
        ("/prices", {"ticker": "btc_usd", "cursor": "garbage!"}, "cursor"),
        ("/prices", {"ticker": "btc_usd", "cursor": "dHM6MQ", "offset": 5}, "cursor"),
        ("/prices/range", {"ticker": "btc_usd", "from_ts": 20, "to_ts": 10}, "from_ts"),
        ("/prices/range", {"ticker": "btc_usd", "from_ts": -5}, "from_ts"),
        ("/prices/range", {"ticker": "btc_usd", "to_ts": 10**30}, "to_ts"),
        ("/prices/range", {"ticker": "btc_usd", "from_ts": 1.5}, "from_ts"),
        ("/prices/latest", {"ticker": "btc_usd", "verbose": 1}, "verbose"),
    ],
)
async def test_bad_input_is_a_clear_422(
    api: httpx.AsyncClient, path: str, params: dict[str, Any], needle: str
) -> None:
    response = await api.get(path, params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert needle in body["detail"]
    assert isinstance(body["errors"], list)


async def test_repeated_parameter_is_rejected(api: httpx.AsyncClient) -> None:
    response = await api.get("/prices/latest?ticker=btc_usd&ticker=eth_usd")
    assert response.status_code == 422
    assert "more than once" in response.json()["detail"]


async def test_unknown_path_is_json_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


async def test_openapi_describes_every_endpoint(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths) == {
        "/prices",
        "/prices/latest",
        "/prices/range",
        "/prices/stream",
        "/tickers",
        "/health",
        "/coverage",
        "/livez",
        "/readyz",
        "/prices/candles",
        "/prices/at",
        "/prices/snapshot",
        "/prices/export",
        "/settlements",
        "/prices/resample",
        "/quality",
    }
    assert {"200", "404", "422", "503"} <= set(paths["/prices/latest"]["get"]["responses"])
    params = {p["name"] for p in paths["/prices/range"]["get"]["parameters"]}
    assert params == {"ticker", "from_ts", "to_ts", "limit", "cursor"}
    price = schema["components"]["schemas"]["PriceOut"]["properties"]["price"]
    assert price["type"] == "number"
    assert (await api.get("/docs")).status_code == 200


async def test_latest_is_cached_briefly(engine: AsyncEngine, db_url: str) -> None:
    await store(engine, "btc_usd", (100, "1.5"))
    async with api_client(make_settings(db_url, api_latest_cache_seconds=0.5)) as client:
        assert (await client.get("/prices/latest?ticker=btc_usd")).json()["ts"] == 100
        cached_by = time.monotonic()  # the entry was made before this, so it expires before +0.5 s
        await store(engine, "btc_usd", (200, "2.5"))
        assert (await client.get("/prices/latest?ticker=btc_usd")).json()["ts"] == 100  # from memory
        await asyncio.sleep(max(0.0, cached_by + 0.5 - time.monotonic()) + 0.01)  # a wait for a time
        assert (await client.get("/prices/latest?ticker=btc_usd")).json()["ts"] == 200
    async with api_client(make_settings(db_url, api_latest_cache_seconds=0)) as uncached:
        await store(engine, "btc_usd", (300, "3.5"))
        assert (await uncached.get("/prices/latest?ticker=btc_usd")).json()["ts"] == 300


async def test_no_cors_headers_unless_configured(api: httpx.AsyncClient, db_url: str) -> None:
    origin = {"Origin": "https://dashboard.example"}
    response = await api.get("/health", headers=origin)
    assert "access-control-allow-origin" not in response.headers
    async with api_client(make_settings(db_url, cors_origins="https://dashboard.example")) as client:
        allowed = await client.get("/health", headers=origin)
        other = await client.get("/health", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://dashboard.example"
    assert "access-control-allow-origin" not in other.headers


async def test_bodies_agree_with_their_response_models(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    """The routes build their JSON bodies by hand (exact decimals, no model round trip): each
    must have its OpenAPI model's fields, no others, and valid values."""
    await store(engine, "btc_usd", (100, "1.5"), (160, "2.25"), (4000, "3"))
    one_of_each: list[tuple[str, dict[str, Any], type[BaseModel]]] = [
        ("/prices", {"ticker": "btc_usd"}, PriceOut),
        ("/prices/range", {"ticker": "btc_usd", "from_ts": 0, "to_ts": 200}, PriceOut),
        ("/prices/latest", {"ticker": "btc_usd"}, LatestOut),
        ("/prices/at", {"ticker": "btc_usd", "ts": 150}, LatestOut),
        ("/prices/snapshot", {"ticker": ["btc_usd", "eth_usd"]}, SnapshotOut),
        ("/prices/candles", {"ticker": "btc_usd", "interval": "1m"}, CandleOut),
        ("/coverage", {"ticker": "btc_usd"}, CoverageOut),
        ("/tickers", {}, TickerOut),
        ("/health", {}, HealthOut),
        ("/livez", {}, HealthOut),
        ("/readyz", {}, ReadinessOut),  # 503: no fresh price, the same model
        ("/prices/latest", {"ticker": "eth_usd"}, ErrorOut),
        ("/prices/at", {"ticker": "btc_usd", "ts": 50}, ErrorOut),
        ("/prices/at", {"ticker": "btc_usd", "ts": 150, "max_age_seconds": 10}, ErrorOut),
        ("/prices", {"ticker": "nope_usd"}, ErrorOut),
        ("/prices", {"ticker": "btc_usd", "limit": 0}, ValidationErrorOut),
    ]
    paths = (await api.get("/openapi.json")).json()["paths"]
    for path, params, model in one_of_each:
        response = await api.get(path, params=params)
        schema = paths[path]["get"]["responses"][str(response.status_code)]["content"]["application/json"]
        documented = schema["schema"].get("items", schema["schema"])["$ref"].rsplit("/", 1)[-1]
        assert documented == model.__name__, (path, response.status_code)
        body = response.json()
        items = body if isinstance(body, list) else [body]
        assert items, (path, params)
        for item in items:
            assert set(item) <= set(model.model_fields), (path, response.status_code, item)
            required = {name for name, field in model.model_fields.items() if field.is_required()}
            assert required <= set(item), (path, response.status_code, item)
            model.model_validate(item)
