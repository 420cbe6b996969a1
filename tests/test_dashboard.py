"""The dashboard at `/`, in a real browser (Debian's chromium driven by Playwright): what it
shows is what the API says, gaps are drawn, new prices arrive live, no console error."""

import hashlib
import math
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.repository import write_transaction
from crypto_client.domain import NewPrice, Source
from tests.support.services import ApiServer, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
GAP_SLOTS = 5


@pytest.fixture
async def seeded(engine: AsyncEngine) -> dict[str, Any]:
    """Six hours of btc_usd at one-minute slots, some back-filled (from the chart or from
    trades), five slots missing."""
    end = int(time.time()) // 60 * 60 - 60
    start = end - 6 * 3600
    gap_start = end - 2 * 3600
    missing = set(range(gap_start, gap_start + GAP_SLOTS * 60, 60))
    rows = []
    for n, slot in enumerate(range(start, end + 1, 60)):
        if slot in missing:
            continue
        source: Source = "backfill" if n % 17 == 0 else "trade" if n % 23 == 0 else "poll"
        price = 43000 + 400 * math.sin(n / 45) + 120 * math.sin(n / 7) + (n * 37) % 11
        rows.append(NewPrice("btc_usd", Decimal(f"{price:.2f}"), slot, slot, source))
    async with write_transaction(engine) as writer:
        await writer.insert_many(rows)
        await writer.insert_many([NewPrice("eth_usd", Decimal("2291.40"), end, end)])
        await writer.track(["btc_usd", "eth_usd"], start)
    return {"gap_start": gap_start, "rows": len(rows)}


@pytest.fixture
def api(db_url: str, seeded: dict[str, Any], tmp_path: Path) -> Iterator[ApiServer]:
    env = {"DATABASE_URL": db_url, "TICKERS": "btc_usd,eth_usd", "INGEST_INTERVAL_SECONDS": "60"}
    with ApiServer.command("api", env, tmp_path) as server:
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        unavailable("Debian's chromium is not installed (apt-get install -y chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        await launched.close()


async def state(page: Page) -> dict[str, Any]:
    found: dict[str, Any] = await page.evaluate("() => JSON.parse(JSON.stringify(window.dashboard))")
    return found


async def ready(page: Page) -> None:
    await page.wait_for_function("() => window.dashboard && window.dashboard.ready", timeout=10_000)


async def test_the_dashboard_shows_what_the_api_says_and_follows_it_live(
    api: ApiServer, browser: Browser, engine: AsyncEngine, seeded: dict[str, Any]
) -> None:
    page = await browser.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"{message.type}: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    started = time.monotonic()
    await page.goto(api.url + "/")
    await ready(page)
    load_seconds = time.monotonic() - started

    # The latest price shown is the API's.
    latest = api.get("/prices/latest", ticker="btc_usd").json()
    shown = await page.locator('tr[data-ticker="btc_usd"] td.price').inner_text()
    assert Decimal(shown) == Decimal(str(latest["price"]))
    assert await page.locator('tr[data-ticker="eth_usd"] td.price').inner_text() == "2291.4"

    # The line holds every stored row of the span (one day), and breaks where slots are missing.
    drawn = await state(page)
    assert drawn["ticker"] == "btc_usd"
    values = [point for point in drawn["points"] if "value" in point]
    assert len(values) == seeded["rows"]
    stored = api.get(
        "/prices/range", ticker="btc_usd", from_ts=int(time.time()) - 86_400, limit=10_000
    ).json()
    assert [(p["time"], Decimal(str(p["value"]))) for p in values] == [
        (row["ts"], Decimal(str(row["price"]))) for row in stored
    ]
    backfilled = [p for p in values if "color" in p]
    # Trade-sourced points are marked like back-filled ones.
    assert len(backfilled) == sum(row["source"] in ("backfill", "trade") for row in stored)
    assert {row["source"] for row in stored} == {"poll", "backfill", "trade"}
    coverage = api.get("/coverage", ticker="btc_usd", from_ts=drawn["points"][0]["time"]).json()
    assert [(g["from_ts"], g["slots"]) for g in drawn["gaps"]] == [(seeded["gap_start"], GAP_SLOTS)]
    assert [(g["from_ts"], g["slots"]) for g in coverage["gaps"]] == [(seeded["gap_start"], GAP_SLOTS)]
    breaks = [p["time"] for p in drawn["points"] if "value" not in p]
    assert breaks == [seeded["gap_start"]]
    assert "5 slots missing" in await page.locator("#gaps").inner_text()

    # A new price pushed through the stream appears without a reload.
    now = int(time.time())
    async with write_transaction(engine) as writer:
        await writer.insert_many([NewPrice("btc_usd", Decimal("45123.45"), now, None, "stream")])
    await page.wait_for_function(
        "() => document.querySelector('tr[data-ticker=\"btc_usd\"] td.price').textContent === '45123.45'",
        timeout=10_000,
    )
    last = (await state(page))["points"][-1]
    assert (last["time"], last["value"], "color" in last) == (now, 45123.45, False)

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "dashboard-line.png", full_page=True)

    # Candles, chosen by keyboard.
    await page.get_by_role("button", name="Candles").focus()
    await page.keyboard.press("Enter")
    await page.wait_for_function("() => window.dashboard.mode === 'candles' && window.dashboard.ready")
    await page.wait_for_function("() => window.dashboard.points.some((p) => p.open !== undefined)")
    candles = api.get("/prices/candles", ticker="btc_usd", interval="15m", from_ts=now - 86_400).json()
    bars = [p for p in (await state(page))["points"] if "open" in p]
    assert [(b["time"], b["close"]) for b in bars] == [(c["ts"], c["close"]) for c in candles]

    await page.screenshot(path=ARTIFACTS / "dashboard-candles.png", full_page=True)
    draws = (await state(page))["draws"]
    await page.emulate_media(color_scheme="dark")
    background = await page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)"
    await page.wait_for_function(f"() => window.dashboard.draws > {draws}")  # redrawn in dark colours
    await page.screenshot(path=ARTIFACTS / "dashboard-dark.png", full_page=True)
    assert problems == []
    assert load_seconds < 5  # the budget of one second is measured in bench/
    await page.close()


def test_the_page_and_its_chart_library_are_served_offline(api: ApiServer) -> None:
    page = api.get("/")
    assert page.status_code == 200
    assert "https://cdn" not in page.text
    library = api.get("/static/lightweight-charts/lightweight-charts.standalone.production.js")
    assert library.status_code == 200
    vendored = Path(__file__).resolve().parent.parent / "src/crypto_client/api/static/lightweight-charts"
    assert "Apache License" in (vendored / "LICENSE").read_text()
    recorded = (vendored / "VERSION").read_text()
    assert hashlib.sha256(library.content).hexdigest() in recorded  # the pinned file, unedited
    for asset in ("/static/dashboard/dashboard.js", "/static/dashboard/dashboard.css"):
        assert api.get(asset).status_code == 200, asset
