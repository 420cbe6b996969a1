"""Data out for research through a real API server over HTTP, on PostgreSQL and on SQLite:
the resampled grid, the quality report and the Parquet export."""

import io
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import httpx
import polars
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.engine import create_engine
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice, Source
from crypto_client.export.parquet import ROW_GROUP_ROWS
from tests.support import local_http
from tests.support.databases import empty_database
from tests.support.services import ApiServer

DAY = 86_400
D0 = 1_704_067_200  # 2024-01-01T00:00:00Z, a closed day
# The extremes of what the service stores: just below 10^20, and 18 decimal places.
LARGEST = "99999999999999999999.999999999999999999"
SMALLEST = "0.000000000000000001"


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def backend_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture(scope="module")
def server(backend_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    env = {"DATABASE_URL": backend_url, "TICKERS": "btc_usd,eth_usd", "INGEST_INTERVAL_SECONDS": "60"}
    with ApiServer.command("api", env, tmp_path_factory.mktemp("api")) as api:
        yield api


@pytest.fixture
async def writer_engine(backend_url: str) -> AsyncIterator[AsyncEngine]:
    await empty_database(backend_url)
    engine = create_engine(backend_url)
    yield engine
    await engine.dispose()
    await empty_database(backend_url)


async def store(
    engine: AsyncEngine,
    ticker: str,
    points: list[tuple[int, str]],
    source: Source = "poll",
    slotted: bool = True,
) -> None:
    async with engine.begin() as connection:
        await PriceWriter(connection).insert_many(
            [NewPrice(ticker, Decimal(p), ts, ts - ts % 60 if slotted else None, source) for ts, p in points]
        )


def get(server: ApiServer, path: str, **params: Any) -> httpx.Response:
    return local_http.get(server.url + path, params=params, timeout=30)


def walk(server: ApiServer, path: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every item across the Link pages, and how many pages."""
    items: list[dict[str, Any]] = []
    pages = 0
    url: str | None = server.url + path
    query: dict[str, Any] | None = params
    while url is not None:
        response = local_http.get(url, params=query, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json(parse_float=Decimal)
        items.extend(body["days"] if isinstance(body, dict) else body)
        pages += 1
        link = response.links.get("next", {}).get("url")
        url, query = (server.url + link, None) if link else (None, None)
    return items, pages


# --- /prices/resample ---------------------------------------------------------------------


async def test_resample_fill_policies(server: ApiServer, writer_engine: AsyncEngine) -> None:
    # Minute buckets 0, 2 and 3 have rows; bucket 1 and 4 do not.
    await store(writer_engine, "btc_usd", [(D0 + 5, "100.5"), (D0 + 130, "99.00")])
    await store(writer_engine, "btc_usd", [(D0 + 50, "101.25")], "stream", slotted=False)
    await store(writer_engine, "btc_usd", [(D0 + 150, "98.10")], "backfill", slotted=False)
    await store(writer_engine, "btc_usd", [(D0 + 185, "97")])
    bounds = {"ticker": "btc_usd", "interval": "1m", "from_ts": D0, "to_ts": D0 + 299}

    stored, _ = walk(server, "/prices/resample", **bounds)
    assert stored == [
        {"ts": D0, "price": Decimal("101.25"), "count": 2, "backfilled": 0, "trade": 0, "filled": False},
        {"ts": D0 + 120, "price": Decimal("98.10"), "count": 2, "backfilled": 1, "trade": 0, "filled": False},
        {"ts": D0 + 180, "price": Decimal("97"), "count": 1, "backfilled": 0, "trade": 0, "filled": False},
    ]
    nulls, _ = walk(server, "/prices/resample", **bounds, fill="null")
    assert [(b["ts"] - D0, b["price"], b["filled"]) for b in nulls] == [
        (0, Decimal("101.25"), False),
        (60, None, True),
        (120, Decimal("98.10"), False),
        (180, Decimal("97"), False),
        (240, None, True),
    ]
    carried, _ = walk(server, "/prices/resample", **bounds, fill="prev")
    assert [(b["ts"] - D0, b["price"], b["filled"], b["count"]) for b in carried] == [
        (0, Decimal("101.25"), False, 2),
        (60, Decimal("101.25"), True, 0),
        (120, Decimal("98.10"), False, 2),
        (180, Decimal("97"), False, 1),
        (240, Decimal("97"), True, 0),
    ]
    # A grid that begins before the first row has nothing to carry yet.
    early, _ = walk(server, "/prices/resample", **{**bounds, "from_ts": D0 - 120}, fill="prev")
    assert [(b["ts"] - D0, b["price"]) for b in early[:3]] == [
        (-120, None),
        (-60, None),
        (0, Decimal("101.25")),
    ]


@pytest.mark.parametrize("fill", ["none", "null", "prev"])
async def test_resample_pages_cover_the_grid_once(
    server: ApiServer, writer_engine: AsyncEngine, fill: str
) -> None:
    # Every third minute over 100 minutes; prices exact to 18 places.
    await store(
        writer_engine, "btc_usd", [(D0 + m * 60 + 7, f"{40000 + m}.{m:018d}") for m in range(0, 100, 3)]
    )
    params = {"ticker": "btc_usd", "interval": "1m", "from_ts": D0, "to_ts": D0 + 100 * 60 - 1, "fill": fill}
    whole, pages = walk(server, "/prices/resample", **params, limit=10_000)
    paged, many = walk(server, "/prices/resample", **params, limit=7)
    assert pages == 1
    assert many > 3
    assert paged == whole
    assert len(whole) == (34 if fill == "none" else 100)
    assert [b["ts"] for b in whole] == sorted({b["ts"] for b in whole})
    stored = [b for b in whole if not b["filled"]]
    assert len(stored) == 34
    assert stored[1]["price"] == Decimal("40003.000000000000000003")


async def test_resample_unknown_ticker_and_bad_parameters(
    server: ApiServer, writer_engine: AsyncEngine
) -> None:
    unknown = get(server, "/prices/resample", ticker="nope_usd", interval="1m")
    assert unknown.status_code == 404
    assert "unknown ticker 'nope_usd'" in unknown.json()["detail"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"interval": "7m"}, "interval"),
        ({"interval": "1m", "fill": "linear"}, "fill"),
        ({"interval": "1m", "from_ts": 10, "to_ts": 5}, "from_ts"),
        ({"interval": "1m", "limit": 0}, "limit"),
        ({"interval": "1m", "cursor": "garbage"}, "cursor"),
    ]
    for params, word in cases:
        response = get(server, "/prices/resample", ticker="btc_usd", **params)
        assert response.status_code == 422, (params, response.text)
        assert word in response.json()["detail"], response.text


# --- /quality -----------------------------------------------------------------------------


async def test_quality_of_a_day_with_a_gap_jumps_and_two_sources(
    server: ApiServer, writer_engine: AsyncEngine
) -> None:
    # 1,380 of the day's 1,440 minute slots: an hour missing from 10:00; a polled row in every
    # other minute at 2291.40, except a jump to 2400 at 12:00 (and back at 12:01).
    minutes = [m for m in range(1440) if not 600 <= m < 660]
    prices = {720: "2400.00"}
    await store(writer_engine, "eth_usd", [(D0 + m * 60, prices.get(m, "2291.40")) for m in minutes])
    # The chart's value 30 s into 05:00, beside that minute's polled row.
    await store(writer_engine, "eth_usd", [(D0 + 300 * 60 + 30, "2291.15")], "backfill", slotted=False)
    await store(writer_engine, "eth_usd", [(D0 + DAY + 60 * m, "2300") for m in range(3)])

    days, _ = walk(server, "/quality", ticker="eth_usd", from_ts=D0, to_ts=D0 + 2 * DAY - 1)
    first = days[0]
    assert first["day"] == "2024-01-01"
    assert first["from_ts"] == D0
    assert first["expected_slots"] == 1440
    assert first["stored_slots"] == {"poll": 1380}
    assert first["missing_slots"] == 60
    assert first["completeness"] == Decimal("0.958333")
    assert first["rows"] == 1381
    assert first["longest_gap"] == {"from_ts": D0 + 600 * 60, "to_ts": D0 + 660 * 60 - 1, "slots": 60}
    jump = first["largest_absolute_jump"]
    assert (jump["ts"], jump["previous_price"], jump["price"], jump["change"]) == (
        D0 + 720 * 60,
        Decimal("2291.40"),
        Decimal("2400.00"),
        Decimal("108.60"),
    )
    assert first["largest_relative_jump"]["ts"] == D0 + 720 * 60
    assert first["largest_source_difference"] == {
        "minute_ts": D0 + 300 * 60,
        "poll": Decimal("2291.40"),
        "other": Decimal("2291.15"),
        "other_source": "backfill",
        "difference": Decimal("0.25"),
    }
    second = days[1]
    assert second["expected_slots"] == 1440
    assert second["stored_slots"] == {"poll": 3}
    # The jump into the day compares with the last row of the day before.
    assert second["largest_absolute_jump"]["previous_ts"] == D0 + 1439 * 60
    assert second["longest_gap"] == {"from_ts": D0 + DAY + 180, "to_ts": D0 + 2 * DAY - 1, "slots": 1437}
    # Paged by day, the same days.
    paged, pages = walk(server, "/quality", ticker="eth_usd", from_ts=D0, to_ts=D0 + 2 * DAY - 1, limit=1)
    assert pages == 2
    assert paged == days


async def test_quality_unknown_ticker_and_bad_parameters(
    server: ApiServer, writer_engine: AsyncEngine
) -> None:
    assert get(server, "/quality", ticker="nope_usd").status_code == 404
    assert get(server, "/quality", ticker="btc_usd").json()["days"] == []  # configured, nothing stored
    cases: list[dict[str, Any]] = [{"from_ts": 9, "to_ts": 1}, {"limit": 1001}, {"cursor": "!"}, {"day": "x"}]
    for params in cases:
        response = get(server, "/quality", ticker="btc_usd", **params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["detail"]


def duckdb_rows(pattern: str) -> list[tuple[Any, ...]]:
    query = "SELECT ticker, ts, price, source FROM read_parquet(?) ORDER BY ticker, ts"
    return duckdb.execute(query, [pattern]).fetchall()


# --- /prices/export?format=parquet -------------------------------------------------------


def exact_rows(server: ApiServer, ticker: str) -> list[tuple[str, int, Decimal, str]]:
    rows, _ = walk(server, "/prices", ticker=ticker, limit=10_000)
    return [(r["ticker"], r["ts"], r["price"], r["source"]) for r in rows]


@pytest.mark.slow
async def test_parquet_export_is_exact_in_pyarrow_duckdb_and_polars(
    server: ApiServer, writer_engine: AsyncEngine, tmp_path: Path
) -> None:
    extremes = [LARGEST, SMALLEST, "2291.40", "1", "12345678901234567890.123456789012345678"]
    await store(writer_engine, "btc_usd", [(D0 + i * 60, p) for i, p in enumerate(extremes)])
    # More rows than a row group, so that the body is several of them.
    await store(
        writer_engine, "btc_usd", [(D0 + DAY + i, f"{i}.5") for i in range(1, 120_001)], slotted=False
    )
    response = get(server, "/prices/export", ticker="btc_usd", format="parquet")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    assert response.headers["content-disposition"].endswith('.parquet"')
    table = pq.read_table(io.BytesIO(response.content))
    assert pq.ParquetFile(io.BytesIO(response.content)).num_row_groups == -(-120_005 // ROW_GROUP_ROWS)
    assert table.schema.field("price").type == pa.decimal128(38, 18)
    assert pa.types.is_dictionary(table.schema.field("ticker").type)
    expected = exact_rows(server, "btc_usd")
    assert len(expected) == 120_005
    got = list(zip(*(table.column(c).to_pylist() for c in ("ticker", "ts", "price", "source")), strict=True))
    assert got == expected
    assert table.column("price_text").to_pylist()[:5] == extremes
    assert [t.timestamp() for t in table.column("time").to_pylist()[:2]] == [D0, D0 + 60]

    path = tmp_path / "export.parquet"
    path.write_bytes(response.content)
    in_duckdb = duckdb_rows(str(path))
    assert in_duckdb == expected
    frame = polars.read_parquet(path)
    assert frame.schema["price"] == polars.Decimal(38, 18)
    assert list(frame.select("ticker", "ts", "price", "source").iter_rows()) == expected


async def test_a_cut_parquet_body_is_no_parquet_file(server: ApiServer, writer_engine: AsyncEngine) -> None:
    await store(writer_engine, "btc_usd", [(D0 + i, "1.5") for i in range(1000)], slotted=False)
    body = get(server, "/prices/export", ticker="btc_usd", format="parquet").content
    assert pq.read_table(io.BytesIO(body)).num_rows == 1000
    # Cut anywhere before its end, the footer is gone and every reader refuses the file.
    for cut in (len(body) // 2, len(body) - 1):
        with pytest.raises(pa.ArrowInvalid):
            pq.read_table(io.BytesIO(body[:cut]))


async def test_parquet_export_of_an_unknown_ticker_is_404(
    server: ApiServer, writer_engine: AsyncEngine
) -> None:
    assert get(server, "/prices/export", ticker="nope_usd", format="parquet").status_code == 404
    assert get(server, "/prices/export", ticker="btc_usd", format="xlsx").status_code == 422
    empty = get(server, "/prices/export", ticker="btc_usd", format="parquet")
    assert empty.status_code == 200
    assert pq.read_table(io.BytesIO(empty.content)).num_rows == 0
