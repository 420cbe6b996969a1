"""The dashboard at `/`, in a real browser (Debian's chromium driven by Playwright): what it
shows is what the API says, gaps are drawn, new prices arrive live, no console error."""

import hashlib
import math
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Dialog, Page, async_playwright
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice, Source
from tests.support import launcher
from tests.support.services import ApiServer, crypto_client, free_port, unavailable
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
GAP_SLOTS = 5


@pytest.fixture
async def seeded(engine: AsyncEngine) -> dict[str, Any]:
    """Six hours of btc_usd at one-minute slots, some back-filled (from the chart or from
    trades), five slots missing."""
    # Up to the slot in progress: nothing ingests here, so the first minute after the rows is
    # missing once it is complete, at least 60 s from now (from the previous slot it was as
    # little as 0 s, which a loaded machine's browser start outlasted).
    end = int(time.time()) // 60 * 60
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


@pytest.fixture(scope="module")
async def chromium_browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        unavailable("Debian's chromium is not installed (apt-get install -y chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        await launched.close()


@pytest.fixture
async def browser(chromium_browser: Browser) -> AsyncIterator[Browser]:
    """One browser for the module (a launch costs seconds of CPU); each test's pages are in
    their own contexts (no shared storage), all closed when it ends."""
    yield chromium_browser
    for context in chromium_browser.contexts:
        await context.close()


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
    # Back-filled and trade-sourced rows have their colour, except the row before the gap: the
    # segment leaving it (a line segment takes the colour of its first point) is transparent,
    # so the line breaks.
    before_gap = seeded["gap_start"] - 60
    assert [p["time"] for p in values if p.get("color") == "transparent"] == [before_gap]
    marked = [p["time"] for p in values if p.get("color") not in (None, "transparent")]
    expected = [
        row["ts"] for row in stored if row["source"] in ("backfill", "trade") and row["ts"] != before_gap
    ]
    assert marked == expected
    assert {row["source"] for row in stored} == {"poll", "backfill", "trade"}
    coverage = api.get("/coverage", ticker="btc_usd", from_ts=drawn["points"][0]["time"]).json()
    assert [(g["from_ts"], g["slots"]) for g in drawn["gaps"]] == [(seeded["gap_start"], GAP_SLOTS)]
    assert [(g["from_ts"], g["slots"]) for g in coverage["gaps"]] == [(seeded["gap_start"], GAP_SLOTS)]
    # Each missing slot is a whitespace point in the series itself: the line breaks there, and
    # the gap is as wide on the time axis as the slots it lacks.
    missing = [seeded["gap_start"] + 60 * n for n in range(GAP_SLOTS)]
    breaks = [p["time"] for p in drawn["points"] if "value" not in p]
    assert breaks == missing
    before, after = missing[0] - 60, missing[-1] + 60
    x = await page.evaluate(
        "(times) => times.map((t) => window.dashboard.x(t))", [before - 60, before, after]
    )
    slot_width = x[1] - x[0]
    assert slot_width > 0
    assert x[2] - x[1] == pytest.approx((GAP_SLOTS + 1) * slot_width, abs=0.5)
    # Zoomed in on the gap, for a person to look at.
    await page.evaluate(f"() => window.dashboard.show({before - 1200}, {after + 1200})")
    await page.wait_for_function(f"() => window.dashboard.x({after}) - window.dashboard.x({before}) > 100")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.locator("#chart").screenshot(path=ARTIFACTS / "dashboard-gap.png")
    await page.evaluate("() => window.dashboard.fit()")
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
    vendored = Path(__file__).resolve().parents[2] / "src/crypto_client/api/static/lightweight-charts"
    assert "Apache License" in (vendored / "LICENSE").read_text()
    recorded = (vendored / "VERSION").read_text()
    assert hashlib.sha256(library.content).hexdigest() in recorded  # the pinned file, unedited
    for asset in ("/static/dashboard/dashboard.js", "/static/dashboard/dashboard.css"):
        assert api.get(asset).status_code == 200, asset


# Records every text drawn on a canvas with its x and the animation frame it was drawn in: the
# time axis's labels as the chart rendered them.
RECORD_CANVAS_TEXT = """
window.drawnText = [];
let frame = 0;
const count = () => { frame += 1; requestAnimationFrame(count); };
requestAnimationFrame(count);
const fillText = CanvasRenderingContext2D.prototype.fillText;
CanvasRenderingContext2D.prototype.fillText = function (text, x, y, ...rest) {
  window.drawnText.push({ text: String(text), x: Math.round(this.getTransform().e + x), frame });
  return fillText.call(this, text, x, y, ...rest);
};
"""
TIME_OF_DAY = re.compile(r"^\d\d:\d\d(:\d\d)?$")


@pytest.fixture
async def api_1s(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[tuple[ApiServer, set[int], int]]:
    """Four minutes of one-second slots of sol_usdc, twenty of them missing."""
    end = int(time.time()) - 2
    start = end - 240
    gap = set(range(end - 120, end - 100))
    rows = [
        NewPrice("sol_usdc", Decimal(f"{98 + math.sin(ts / 9):.4f}"), ts, ts)
        for ts in range(start, end + 1)
        if ts not in gap
    ]
    async with write_transaction(engine) as writer:
        await writer.insert_many(rows)
        await writer.track(["sol_usdc"], start)
    env = {"DATABASE_URL": str(engine.url.render_as_string(hide_password=False)), "TICKERS": "sol_usdc"}
    env["INGEST_INTERVAL_SECONDS"] = "1"
    with ApiServer.command("api", env, tmp_path) as server:
        yield server, gap, end


async def test_a_short_span_labels_seconds_and_gives_each_missing_second_its_width(
    api_1s: tuple[ApiServer, set[int], int], browser: Browser
) -> None:
    api, gap, end = api_1s
    page = await browser.new_page()
    await page.add_init_script(RECORD_CANVAS_TEXT)
    await page.goto(api.url + "/")
    await ready(page)
    drawn = await state(page)
    # One whitespace point per missing second: the gap, and the seconds since the last row.
    whitespace = [p["time"] for p in drawn["points"] if "value" not in p]
    assert [t for t in whitespace if t <= end] == sorted(gap)
    assert whitespace[len(gap) :] == list(range(end + 1, end + 1 + len(whitespace) - len(gap)))
    await page.wait_for_function("() => window.drawnText.some((t) => /^\\d\\d:\\d\\d/.test(t.text))")
    two_frames = "() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
    await page.evaluate(two_frames)
    texts = await page.evaluate("() => window.drawnText")
    labels = [t for t in texts if TIME_OF_DAY.match(t["text"])]
    last_frame = max(t["frame"] for t in labels)
    shown = [(t["x"], t["text"]) for t in labels if t["frame"] == last_frame]
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "dashboard-seconds.png", full_page=True)
    texts_shown = [text for _, text in sorted(set(shown))]
    assert len(texts_shown) >= 3, shown
    # Every tick mark says a different time: no minute is repeated for ticks between minutes.
    assert len(set(texts_shown)) == len(texts_shown), texts_shown
    assert any(len(text) == 8 for text in texts_shown), texts_shown  # HH:MM:SS
    await page.close()


async def test_without_prices_the_dashboard_says_why_instead_of_an_empty_chart(
    browser: Browser, engine: AsyncEngine, db_url: str, tmp_path: Path
) -> None:
    del engine  # an empty database
    env = {
        "DATABASE_URL": db_url,
        "TICKERS": "btc_usd",
        "DERIBIT_RPC_URL": f"http://127.0.0.1:{free_port()}/api/v2",  # nothing listens there
        "DERIBIT_MAX_RETRIES": "0",
        # The page explains the latest completed slot's gap: at 1 s a tick made late by a busy
        # machine left that slot without its failure yet ("no tick ran"), which is true then.
        "INGEST_INTERVAL_SECONDS": "3",
        "BACKFILL_INTERVAL_SECONDS": "0",
    }
    with ApiServer.command("serve", env, tmp_path, ready_path="/livez") as serve:

        def deribit_failed() -> bool:
            gaps = serve.get("/coverage", ticker="btc_usd").json()["gaps"]
            return any(gap["reason"] == "deribit_failed" for gap in gaps)

        wait_until(deribit_failed, 30, what="a slot that Deribit failed")
        page = await browser.new_page()
        await page.goto(serve.url + "/")
        await ready(page)
        empty = page.locator("#empty")
        await empty.wait_for(state="visible", timeout=10_000)
        text = await empty.inner_text()
        assert "No price of btc_usd is stored" in text
        assert "deribit failed: " in text
        assert "connection failed" in text
        assert "crypto-client serve --simulate" in text
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-offline.png"))


async def test_the_dashboard_asks_for_a_key_once_and_streams_with_it(
    db_url: str, seeded: dict[str, Any], browser: Browser, engine: AsyncEngine, tmp_path: Path
) -> None:
    created = launcher.run(
        crypto_client("keys", "create", f"browser-{time.time_ns()}"),
        env={"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip()
    env = {"DATABASE_URL": db_url, "TICKERS": "btc_usd,eth_usd", "API_KEYS_REQUIRED": "true"}
    with ApiServer.command("api", env, tmp_path, ready_path="/livez") as api:
        page = await browser.new_page()
        asked: list[str] = []

        async def answer(dialog: Dialog) -> None:
            asked.append(dialog.message)
            await dialog.accept(key)

        page.on("dialog", answer)
        await page.goto(api.url + "/")
        await ready(page)
        assert len(asked) == 1
        assert "API key" in asked[0]
        await page.reload()  # kept in the browser: not asked again
        await ready(page)
        assert len(asked) == 1

        now = int(time.time())
        async with write_transaction(engine) as writer:
            await writer.insert_many([NewPrice("btc_usd", Decimal("45999.5"), now, None, "stream")])
        await page.wait_for_function(
            "() => document.querySelector('tr[data-ticker=\"btc_usd\"] td.price').textContent === '45999.5'",
            timeout=10_000,
        )
        await page.close()


def grade(completeness: float | None) -> str:
    """The cell class calendar.js gives a day of this completeness."""
    if completeness is None:
        return "none"
    for least, name in ((1, "complete"), (0.99, "high"), (0.9, "medium")):
        if completeness >= least:
            return name
    return "low" if completeness > 0 else "empty"


async def test_the_calendar_strip_shows_each_days_completeness_from_quality(
    api: ApiServer, browser: Browser, seeded: dict[str, Any]
) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 1000})
    await page.goto(api.url + "/")
    await ready(page)
    await page.wait_for_function("() => window.dashboard.calendar.ready", timeout=10_000)
    calendar = (await state(page))["calendar"]
    assert calendar["ticker"] == "btc_usd"
    today = int(time.time()) // 86_400 * 86_400
    report = api.get("/quality", ticker="btc_usd", from_ts=today - 29 * 86_400).json()
    assert [(d["day"], d["completeness"]) for d in calendar["days"]] == [
        (d["day"], d["completeness"]) for d in report["days"]
    ]
    # Six hours with five slots missing: the day holding the gap is not complete.
    cells = page.locator("#calendar li.day")
    assert await cells.count() == len(report["days"]) >= 1
    classes = [await cells.nth(i).get_attribute("class") for i in range(await cells.count())]
    assert classes == [f"day {grade(d['completeness'])}" for d in report["days"]]
    assert "day complete" not in classes or len(classes) == 2
    missing = sum(d["missing_slots"] for d in report["days"])
    # The gap, plus the slots completed since the seeded rows end (nothing is ingesting).
    trailing = max(0, (int(time.time()) // 60 * 60 - 60 - (seeded["gap_start"] + 2 * 3600)) // 60)
    assert GAP_SLOTS <= missing <= GAP_SLOTS + trailing
    label = await cells.last.get_attribute("aria-label")
    last = report["days"][-1]
    assert label is not None
    assert f"{last['day']}:" in label
    assert f"of {last['expected_slots']} slots" in label
    # Another ticker: the strip follows the chart.
    await page.locator('tr[data-ticker="eth_usd"] button').click()
    await page.wait_for_function("() => window.dashboard.calendar.ticker === 'eth_usd'", timeout=10_000)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.locator('tr[data-ticker="btc_usd"] button').click()
    await page.wait_for_function("() => window.dashboard.calendar.ticker === 'btc_usd'", timeout=10_000)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-calendar.png"), full_page=True)
