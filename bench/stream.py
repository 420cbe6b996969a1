"""The live path, measured with real processes: the simulator's WebSocket, `crypto-client
stream` storing it, `crypto-client api` serving `/prices/stream` to many SSE clients.

Freshness is from the simulator sending a notification to an SSE client receiving the stored
row. The simulator sends on whole multiples of its interval (1 s here), so the notification
behind a row with `ts` was sent at `ts` (plus the few ms it takes to send a burst: the figure
is an upper bound).
"""

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
from httpx_sse import aconnect_sse

from crypto_client.sim.prices import INDEXES, SYNTHETIC_INDEXES
from tests.support.services import ApiServer, Process, SimServer, crypto_client, free_port


@contextmanager
def stream_consumer(env: dict[str, str], log: Path) -> Iterator[psutil.Process]:
    process = Process(crypto_client("stream"), env, log)
    try:
        yield psutil.Process(process.popen.pid)
    finally:
        process.stop()


async def _sse_client(url: str, tickers: list[str], delays: list[float], ready: list[int]) -> None:
    params = [("ticker", ticker) for ticker in tickers]
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
        aconnect_sse(client, "GET", url + "/prices/stream", params=params) as source,
    ):
        source.response.raise_for_status()
        ready.append(1)
        async for event in source.aiter_sse():
            # httpx-sse also yields an empty event for each keep-alive comment.
            if event.event == "price":
                delays.append(time.time() - json.loads(event.data)["ts"])


async def _freshness(url: str, tickers: list[str], clients: int, seconds: float) -> list[float]:
    delays: list[float] = []
    ready: list[int] = []
    tasks = [asyncio.create_task(_sse_client(url, tickers, delays, ready)) for _ in range(clients)]
    while len(ready) < clients:
        await asyncio.sleep(0.05)
        for task in tasks:
            if task.done():
                task.result()
    await asyncio.sleep(2)  # every client connected; rows from now on count
    delays.clear()
    await asyncio.sleep(seconds)
    measured = list(delays)
    for task in tasks:
        if task.done():
            task.result()  # a client that ended early would make the figures lie
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return measured


def cpu_and_rss(process: psutil.Process, seconds: float) -> tuple[float, float]:
    """Share of one core used over `seconds`, and the resident memory at the end (MB)."""
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return used / seconds, process.memory_info().rss / 2**20


def stream_scenarios(
    url: str,
    work: Path,
    *,
    tickers: int,
    clients: int,
    wide_tickers: int,
    seconds: float,
    extra: dict[str, str],
    targets: list[tuple[str, bool, str]],
) -> None:
    sim = SimServer(work)
    names = [*INDEXES, *SYNTHETIC_INDEXES]
    try:
        sim.faults(stream_interval_ms=1000)
        env = {
            "DATABASE_URL": url,
            "DERIBIT_WS_URL": sim.ws_url,
            "INGEST_INTERVAL_SECONDS": "1",
            "LOG_LEVEL": "WARNING",
        }
        subscribed = names[:tickers]
        with (
            stream_consumer({**env, "TICKERS": ",".join(subscribed)}, work / "stream-freshness.log"),
            ApiServer(
                crypto_client("api", "--port", str(port := free_port())),
                {**env, "TICKERS": ",".join(subscribed)},
                work / "api-stream.log",
                port=port,
            ) as api,
        ):
            delays = asyncio.run(_freshness(api.url, subscribed, clients, seconds))
        delays.sort()
        p50 = statistics.median(delays) * 1000
        p99 = delays[int(len(delays) * 0.99)] * 1000
        expected = tickers * clients * seconds
        extra[f"Freshness, {tickers} tickers at 1/s, {clients} SSE clients"] = (
            f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {delays[-1] * 1000:.0f} ms"
            f" ({len(delays):,} events received of {expected:,.0f} expected in {seconds:g} s)"
        )
        targets.append(("stream freshness p99 < 500 ms", p99 < 500, f"{p99:.0f} ms"))

        wide = names[:wide_tickers]
        with stream_consumer({**env, "TICKERS": ",".join(wide)}, work / "stream-wide.log") as consumer:
            time.sleep(5)  # connected, subscribed, the first batches written
            cpu, rss = cpu_and_rss(consumer, seconds)
        extra[f"Stream consumer, {wide_tickers} tickers at 1/s"] = f"{cpu:.1%} of one core, {rss:.0f} MB RSS"
        targets += [
            (f"stream consumer of {wide_tickers} tickers < 25% of a core", cpu < 0.25, f"{cpu:.1%}"),
            (f"stream consumer of {wide_tickers} tickers < 150 MB RSS", rss < 150, f"{rss:.0f} MB"),
        ]
    finally:
        sim.stop()
