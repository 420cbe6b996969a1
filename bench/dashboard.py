"""The dashboard's load time in a real browser (Debian's chromium through Playwright) against
the benchmark's API: until the chart is drawn, for the default span and for everything."""

import asyncio
import shutil
import statistics
import time

from playwright.async_api import async_playwright

_READY = "() => window.dashboard && window.dashboard.ready"


async def _load_times(url: str, times: int) -> tuple[list[float], list[float]]:
    chromium = shutil.which("chromium")
    assert chromium is not None
    first_paint, everything = [], []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for _ in range(times):
                page = await browser.new_page()
                started = time.perf_counter()
                await page.goto(url + "/")
                await page.wait_for_function(_READY, timeout=30_000)
                first_paint.append(time.perf_counter() - started)
                draws = await page.evaluate("() => window.dashboard.draws")
                started = time.perf_counter()
                await page.get_by_role("button", name="All").click()
                await page.wait_for_function(f"() => window.dashboard.draws > {draws}", timeout=30_000)
                everything.append(time.perf_counter() - started)
                await page.close()
        finally:
            await browser.close()
    return first_paint, everything


def dashboard_load(url: str, extra: dict[str, str], targets: list[tuple[str, bool, str]]) -> None:
    if shutil.which("chromium") is None:
        extra["Dashboard load in chromium"] = (
            "not measured: chromium not installed (apt-get install -y chromium)"
        )
        return
    first_paint, everything = asyncio.run(_load_times(url, times=5))
    first, whole = statistics.median(first_paint), statistics.median(everything)
    extra["Dashboard load in chromium (page to drawn chart), median of 5"] = (
        f"{first * 1000:.0f} ms; switching to the whole history (1d candle closes): {whole * 1000:.0f} ms"
    )
    targets.append(("dashboard loads in < 1 s", first < 1, f"{first * 1000:.0f} ms"))
