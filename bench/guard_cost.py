"""The access guard's own cost per request, keys and quotas on against off, without a server,
the network or a database: the middleware called in a loop in front of an app that answers at
once (the key's lookup is cached, as under load; quotas counted in a throwaway Redis).

    uv run python -m bench.guard_cost       # seconds; prints microseconds per request

The best of several alternating runs: on a shared machine, the least disturbed one.
"""

import asyncio
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from starlette.types import Message, Receive, Scope, Send

from crypto_client.api.auth import Access, AccessGuard, generate_key, key_digest
from crypto_client.config import Settings
from crypto_client.db.api_keys import ApiKeyRow
from crypto_client.db.engine import create_engine
from tests.support.services import ThrowawayRedis

REQUESTS = 50_000
RUNS = 6


async def _answer(_scope: Scope, _receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def _discard(_message: Message) -> None:
    return None


async def microseconds_per_request(on: bool, quota_url: str, database: Path) -> float:
    url = f"sqlite:///{database}"
    guarded = {"api_keys_required": True, "api_rate_limit": "100000/second"} if on else {}
    settings = Settings.model_validate({"database_url": url, **guarded})
    engine = create_engine(url)  # never connected: the key's entry is in the cache
    access = Access(settings, engine, quota_url)
    key = generate_key()
    forever = time.monotonic() + 1e9
    access.keys._cache[key_digest(key)] = (
        ApiKeyRow("bench", key_digest(key), 0, None, None),
        forever,
        forever,
    )
    app = SimpleNamespace(state=SimpleNamespace(access=access))
    headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk")]
    if on:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    guard = AccessGuard(_answer)

    async def requests(count: int) -> None:
        for _ in range(count):
            scope: Scope = {
                "type": "http",
                "method": "GET",
                "path": "/prices/latest",
                "query_string": b"ticker=btc_usd",
                "headers": headers,
                "client": ("127.0.0.1", 5000),
                "app": app,
            }
            await guard(scope, _receive_nothing, _discard)

    await requests(2_000)  # warm-up: the first chunk of the quota, caches
    started = time.perf_counter()
    await requests(REQUESTS)
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return elapsed / REQUESTS * 1e6


async def _receive_nothing() -> Message:
    return {"type": "http.disconnect"}


async def main() -> None:
    redis = ThrowawayRedis()
    try:
        with tempfile.TemporaryDirectory() as work:
            database = Path(work) / "unused.db"
            off, on = [], []
            for _ in range(RUNS):
                off.append(await microseconds_per_request(False, "memory://", database))
                on.append(await microseconds_per_request(True, redis.url, database))
    finally:
        redis.stop()
    print(
        f"access guard, µs per request (best of {RUNS}): off {min(off):.1f}, keys + quotas on {min(on):.1f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
