"""Exposure: API keys, quotas, the client address behind a proxy, and the /metrics token,
over HTTP to real `crypto-client api` processes (both backends; Redis for shared quotas)."""

import asyncio
import hashlib
import hmac
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from limits import parse

from crypto_client.api import auth
from crypto_client.api.client_address import client_address
from crypto_client.api.quotas import Quotas
from crypto_client.db.api_keys import ApiKeyRow
from crypto_client.setting_values import parse_networks
from tests.support import launcher, local_http
from tests.support.api import api_client
from tests.support.services import ApiServer, ThrowawayRedis, crypto_client, free_port
from tests.support.settings import make_settings
from tests.support.waiting import wait_until


def keys_command(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return launcher.run(
        crypto_client("keys", *args),
        env={"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin", "LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def create_key(db_url: str, name: str, *args: str) -> str:
    done = keys_command(db_url, "create", name, *args)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("cck_"), key
    assert len(key) == 47, key
    return key


def revoke_key(db_url: str, name: str) -> None:
    done = keys_command(db_url, "revoke", name)
    assert done.returncode == 0, done.stderr


def unique(name: str) -> str:
    return f"{name}-{time.time_ns()}"


@pytest.fixture
def keyed_api(db_url: str, tmp_path: Path) -> Iterator[ApiServer]:
    env = {
        "DATABASE_URL": db_url,
        "API_KEYS_REQUIRED": "true",
        "API_RATE_LIMIT_STORAGE_URL": "memory://",
        "LOG_LEVEL": "INFO",
        "TICKERS": "btc_usd",
    }
    with ApiServer.command("api", env, tmp_path, ready_path="/livez") as server:
        yield server


def _assert_refused(response: httpx.Response, detail_part: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert detail_part in response.json()["detail"]


@pytest.mark.slow
def test_keys_over_http(keyed_api: ApiServer, db_url: str) -> None:
    """401 for a missing, malformed, wrong and revoked key; 200 for a good one in either header;
    the open paths need none; a wrong key and a revoked one get the same answer."""
    name = unique("alice")
    key = create_key(db_url, name)
    url = keyed_api.url + "/tickers"

    _assert_refused(local_http.get(url), "API key is required")
    _assert_refused(local_http.get(url, headers={"Authorization": "Bearer nope"}), "malformed")
    _assert_refused(local_http.get(url, headers={"X-API-Key": key[:-1]}), "malformed")
    _assert_refused(local_http.get(url, headers={"Authorization": f"Basic {key}"}), "malformed")
    wrong = auth.generate_key()
    wrong_answer = local_http.get(url, headers={"Authorization": f"Bearer {wrong}"})
    _assert_refused(wrong_answer, "invalid API key")

    assert local_http.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert local_http.get(url, headers={"X-API-Key": key}).status_code == 200
    assert local_http.get(keyed_api.url + "/metrics").status_code == 401  # no token: guarded like data
    for open_path in ("/health", "/livez", "/readyz", "/", "/openapi.json", "/static/dashboard/dashboard.js"):
        assert local_http.get(keyed_api.url + open_path).status_code in (200, 503), open_path

    revoke_key(db_url, name)
    wait_until(
        lambda: local_http.get(url, headers={"X-API-Key": key}).status_code == 401,
        auth.KEY_CACHE_SECONDS + 5,
        what="the revoked key refused",
    )
    revoked_answer = local_http.get(url, headers={"X-API-Key": key})
    assert revoked_answer.json() == wrong_answer.json()
    assert "Traceback" not in keyed_api.output


@pytest.mark.slow
def test_keys_list_shows_last_use_after_a_flush(keyed_api: ApiServer, db_url: str) -> None:
    name = unique("bob")
    key = create_key(db_url, name, "--rate", "5/second")
    listed = keys_command(db_url, "list").stdout
    assert f"{name}" in listed
    assert "never" in listed.split(name)[1].splitlines()[0]
    assert local_http.get(keyed_api.url + "/tickers", headers={"X-API-Key": key}).status_code == 200
    keyed_api.stop()  # the API writes "last used" at shutdown (and every minute)
    line = keys_command(db_url, "list").stdout.split(name)[1].splitlines()[0]
    assert "never" not in line
    assert "5/second" in line
    assert keys_command(db_url, "create", name).returncode == 1  # the name is taken
    assert keys_command(db_url, "create", unique("c"), "--rate", "lots").returncode == 1


@pytest.fixture
def redis_pair(postgresql_url: str, tmp_path: Path) -> Iterator[tuple[ApiServer, ApiServer, ThrowawayRedis]]:
    redis = ThrowawayRedis()
    env = {
        "DATABASE_URL": postgresql_url,
        "API_KEYS_REQUIRED": "true",
        "CELERY_BROKER_URL": redis.url,  # the quotas' store when none other is set
        "API_KEY_MAX_STREAMS": "1",
        "LOG_LEVEL": "WARNING",
        "TICKERS": "btc_usd",
    }
    try:
        with (
            ApiServer.command("api", env, tmp_path, ready_path="/livez") as first,
            ApiServer.command("api", env, tmp_path, ready_path="/livez") as second,
        ):
            yield first, second, redis
            assert "Traceback" not in first.output + second.output
    finally:
        redis.stop()


@pytest.mark.slow
async def test_quota_holds_across_two_processes_under_64_connections(
    redis_pair: tuple[ApiServer, ApiServer, ThrowawayRedis], postgresql_url: str
) -> None:
    first, second, _redis = redis_pair
    key = create_key(postgresql_url, unique("busy"), "--rate", "50/minute")
    headers = {"X-API-Key": key}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    # No bound on the wait for a free connection: that wait is this test's own 256 requests
    # queueing for 64 connections, and grows with how starved of CPU the machine is.
    timeout = httpx.Timeout(30, pool=None)
    async with local_http.async_client(limits=limits, timeout=timeout) as client:

        async def one(index: int) -> httpx.Response:
            server = first if index % 2 else second
            return await client.get(server.url + "/tickers", headers=headers)

        answers = await asyncio.gather(*(one(index) for index in range(256)))
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 50, statuses
    assert statuses.count(429) == 206
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit-policy"] == "50;w=60"
    assert "quota" in refused.json()["detail"]
    served = next(answer for answer in answers if answer.status_code == 200)
    assert served.headers["ratelimit-policy"] == "50;w=60"


@pytest.mark.slow
def test_retry_after_is_honest(
    redis_pair: tuple[ApiServer, ApiServer, ThrowawayRedis], postgresql_url: str
) -> None:
    first, second, _redis = redis_pair
    headers = {"X-API-Key": create_key(postgresql_url, unique("retry"), "--rate", "3/3 seconds")}
    while (answer := local_http.get(first.url + "/tickers", headers=headers)).status_code == 200:
        pass
    assert answer.status_code == 429
    wait = int(answer.headers["retry-after"])
    assert 1 <= wait <= 3
    time.sleep(wait)  # what is tested is the wait the API asked for, exactly
    assert local_http.get(second.url + "/tickers", headers=headers).status_code == 200


@pytest.mark.slow
def test_expensive_requests_cost_more_and_streams_are_capped_per_key(
    redis_pair: tuple[ApiServer, ApiServer, ThrowawayRedis], postgresql_url: str
) -> None:
    first, _second, _redis = redis_pair
    headers = {"X-API-Key": create_key(postgresql_url, unique("export"), "--rate", "15/minute")}
    assert local_http.get(first.url + "/prices/export?ticker=btc_usd", headers=headers).status_code == 200
    assert local_http.get(first.url + "/prices/export?ticker=btc_usd", headers=headers).status_code == 429
    assert local_http.get(first.url + "/tickers", headers=headers).status_code == 200

    streaming = {"X-API-Key": create_key(postgresql_url, unique("stream"))}
    with local_http.stream("GET", first.url + "/prices/stream", headers=streaming, timeout=10) as open_stream:
        assert open_stream.status_code == 200
        second_stream = local_http.get(first.url + "/prices/stream", headers=streaming, timeout=10)
        assert second_stream.status_code == 429
        assert "at most 1" in second_stream.json()["detail"]


async def test_the_openapi_document_says_what_the_guard_asks(sqlite_url: str) -> None:
    """With keys required: a key in either header for every operation, none for the open
    paths, and the 401 documented; each operation answers without a key as its entry says.
    Without keys the document declares nothing."""
    async with api_client(make_settings(sqlite_url, api_keys_required=True)) as client:
        document = (await client.get("/openapi.json")).json()
        schemes = document["components"]["securitySchemes"]
        assert (schemes["bearerKey"]["type"], schemes["bearerKey"]["scheme"]) == ("http", "bearer")
        header = schemes["headerKey"]
        assert (header["type"], header["in"], header["name"]) == ("apiKey", "header", "X-API-Key")
        assert document["security"] == [{"bearerKey": []}, {"headerKey": []}]  # either one
        open_paths = set()
        for path, operations in document["paths"].items():
            keyless = await client.get(path)
            for operation in operations.values():
                if operation.get("security") == []:
                    open_paths.add(path)
                    assert keyless.status_code in (200, 503), path
                else:
                    assert keyless.status_code == 401, path
                    assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorOut"
                    }
        assert open_paths == {"/health", "/livez", "/readyz"}
        assert "ErrorOut" in document["components"]["schemas"]
    async with api_client(make_settings(sqlite_url)) as client:
        document = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in document["components"]
    assert "security" not in document


async def test_forwarded_for_is_believed_only_from_allowed_proxies(sqlite_url: str) -> None:
    """The in-process client connects from 127.0.0.1: a proxy when allowed, a client otherwise."""
    spoofed = [{"X-Forwarded-For": f"203.0.113.{n}"} for n in (1, 2, 3)]
    base = {"api_rate_limit": "2/minute", "api_rate_limit_storage_url": "memory://"}

    async with api_client(make_settings(sqlite_url, **base)) as client:
        statuses = [(await client.get("/tickers", headers=each)).status_code for each in spoofed]
    assert statuses == [200, 200, 429]  # one address, whatever the header says

    trusting = make_settings(sqlite_url, **base, forwarded_allow_ips="127.0.0.0/8")
    async with api_client(trusting) as client:
        statuses = [(await client.get("/tickers", headers=each)).status_code for each in spoofed]
    assert statuses == [200, 200, 200]  # three clients behind the proxy


def _scope(peer: str, *headers: tuple[str, str]) -> dict[str, Any]:
    return {"client": (peer, 5000), "headers": [(k.encode(), v.encode()) for k, v in headers]}


def test_client_address_chain() -> None:
    proxies = parse_networks(["10.0.0.0/8"])
    assert client_address(_scope("192.0.2.7", ("x-forwarded-for", "203.0.113.1")), proxies) == "192.0.2.7"
    assert client_address(_scope("10.0.0.2", ("x-forwarded-for", "203.0.113.1")), ()) == "10.0.0.2"
    chain = ("x-forwarded-for", "198.51.100.9, 203.0.113.1, 10.0.0.3")
    assert client_address(_scope("10.0.0.2", chain), proxies) == "203.0.113.1"  # the spoofed left is not read
    forwarded = ("forwarded", 'for="[2001:db8::1]:4711";proto=https, for=10.0.0.3')
    assert client_address(_scope("10.0.0.2", forwarded), proxies) == "2001:db8::1"
    assert client_address(_scope("10.0.0.2", ("forwarded", "for=203.0.113.5:80")), proxies) == "203.0.113.5"
    with pytest.raises(ValueError, match="not an IP address"):
        parse_networks(["10.0.0.0/33"])


async def test_request_log_names_the_forwarded_client(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.77"}
    async with api_client(make_settings(sqlite_url)) as client:
        await client.get("/livez", headers=forwarded)
    assert "client=127.0.0.1" in capsys.readouterr().out
    async with api_client(make_settings(sqlite_url, forwarded_allow_ips="127.0.0.1")) as client:
        await client.get("/livez", headers=forwarded)
    assert "client=203.0.113.77" in capsys.readouterr().out


async def test_metrics_with_and_without_the_token(sqlite_url: str) -> None:
    token = "s3cret-scrape-token"
    async with api_client(make_settings(sqlite_url, metrics_token=token, api_keys_required=True)) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        answer = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
        assert "http_request_duration" in answer.text
        assert (await client.get("/tickers", headers={"Authorization": f"Bearer {token}"})).status_code == 401
    async with api_client(make_settings(sqlite_url)) as client:
        assert (await client.get("/metrics")).status_code == 200  # nothing asked: open, as before


def test_api_metrics_on_their_own_port(sqlite_url: str, tmp_path: Path) -> None:
    """METRICS_PORT: the API's process metrics apart from the API (no key, another port)."""
    port = free_port()
    env = {"DATABASE_URL": sqlite_url, "API_KEYS_REQUIRED": "true", "METRICS_PORT": str(port)}
    with ApiServer.command("api", env, tmp_path, ready_path="/livez") as server:
        assert server.get("/tickers").status_code == 401
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        wait_until(lambda: 'route="/livez"' in local_http.get(metrics_url).text, 10, what="the API's metrics")


def test_exposure_warning_at_start(sqlite_url: str, tmp_path: Path) -> None:
    exposed = {"DATABASE_URL": sqlite_url, "API_HOST": "0.0.0.0", "LOG_LEVEL": "INFO"}
    with ApiServer.command("api", exposed, tmp_path, ready_path="/livez") as server:
        pass
    warnings = [line for line in server.output.splitlines() if "with no API keys" in line]
    assert len(warnings) == 1, server.output
    assert "/metrics" in warnings[0]
    guarded = {**exposed, "API_KEYS_REQUIRED": "true"}
    with ApiServer.command("api", guarded, tmp_path, ready_path="/livez") as server:
        pass
    assert "with no API keys" not in server.output


def test_key_comparison_is_constant_time_by_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found or not, exactly one `hmac.compare_digest` of two 32-byte digests decides."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module auth uses
    ring = auth.KeyRing(engine=None)  # type: ignore[arg-type]  # check() reads no database
    stored = ApiKeyRow("alice", auth.key_digest("cck_right"), 0, None, None)
    assert ring.check(stored, auth.key_digest("cck_right")) is stored
    assert ring.check(None, auth.key_digest("cck_unknown")) is None
    assert ring.check(stored, auth.key_digest("cck_wrong")) is None
    assert len(calls) == 3
    assert all(len(a) == len(b) == 32 for a, b in calls)


async def test_wrong_key_takes_as_long_as_a_right_one() -> None:
    """Statistically: the time of the whole check (hash, cache, compare) for a wrong key and
    for the right key of another name, measured interleaved, differ by little. Each is the
    fastest of its batches: the cost of the check itself, not of what else the machine ran."""
    right, wrong = auth.generate_key(), auth.generate_key()
    rows = {auth.key_digest(right): ApiKeyRow("other", auth.key_digest(right), 0, None, None)}

    class Ring(auth.KeyRing):
        async def _lookup(self, digest: bytes) -> ApiKeyRow | None:
            return rows.get(digest)

    ring = Ring(engine=None)  # type: ignore[arg-type]
    assert await ring.identify(right) is not None
    assert await ring.identify(wrong) is None

    def batch(key: str) -> float:
        started = time.perf_counter_ns()
        for _ in range(200):
            ring.check(ring._cache[auth.key_digest(key)][0], hashlib.sha256(key.encode()).digest())
        return time.perf_counter_ns() - started

    right_times, wrong_times = [], []
    for _ in range(300):
        right_times.append(batch(right))
        wrong_times.append(batch(wrong))
    ratio = min(wrong_times) / min(right_times)
    assert 0.8 < ratio < 1.25, ratio


async def test_high_limits_are_taken_from_the_store_in_chunks_and_never_exceeded() -> None:
    """1000/minute: ten permits per trip to the store; one process still gets exactly 1000."""
    quotas = Quotas("memory://", None)
    verdicts = [await quotas.charge("key:chunked", "1000/minute", 1) for _ in range(25)]
    assert all(each is not None and each.allowed for each in verdicts)
    stats = await quotas._limiter.get_window_stats(parse("1000/minute"), "key:chunked")
    counted = 1000 - stats.remaining
    assert counted % 10 == 0  # whole chunks
    assert 25 < counted <= 25 + 2 * 10  # at most the chunk in use and the next one held here
    verdicts += [await quotas.charge("key:chunked", "1000/minute", 1) for _ in range(1075)]
    assert sum(1 for each in verdicts if each is not None and each.allowed) == 1000


async def test_the_next_chunk_is_fetched_before_the_reserve_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a chunk spent, the next is fetched in the background: the requests meanwhile and
    after it spend permits held here, none waits for the store."""
    quotas = Quotas("memory://", None)
    trips: list[int] = []
    hit = quotas._limiter.hit

    async def counted_hit(*args: Any, cost: int = 1) -> bool:
        trips.append(cost)
        return await hit(*args, cost=cost)

    monkeypatch.setattr(quotas._limiter, "hit", counted_hit)
    for _ in range(6):  # chunks of ten: four left, under half
        assert await quotas.charge("key:ahead", "1000/minute", 1) is not None
    (reserve,) = quotas._reserves.values()
    assert trips == [10]
    assert reserve.refill is not None  # under way, not awaited by any request
    assert await reserve.refill
    assert trips == [10, 10]
    for _ in range(4 + 4):  # the four left, then four of the next chunk (six left: no refill yet)
        assert await quotas.charge("key:ahead", "1000/minute", 1) is not None
    assert trips == [10, 10]
    assert reserve.refill is None


async def test_a_key_in_use_is_read_again_before_its_entry_expires() -> None:
    """Past half its life, an entry still answers while the key is read again in the
    background (one read, however many requests): no request waits for the database, and a
    revocation meanwhile is seen once the read is done."""
    key = auth.generate_key()
    digest = auth.key_digest(key)
    stored = {digest: ApiKeyRow("carol", digest, 0, None, None)}
    reads: list[bytes] = []
    gate = asyncio.Event()

    class Ring(auth.KeyRing):
        async def _lookup(self, digest: bytes) -> ApiKeyRow | None:
            reads.append(digest)
            if len(reads) > 1:
                await gate.wait()  # the database is slow
            return stored.get(digest)

    ring = Ring(engine=None)  # type: ignore[arg-type]
    assert await ring.identify(key) is not None
    assert await ring.identify(key) is not None
    assert len(reads) == 1  # cached
    row, _refresh_at, expires_at = ring._cache[digest]
    ring._cache[digest] = (row, time.monotonic() - 0.1, expires_at)  # past half its life
    del stored[digest]  # revoked
    for _ in range(3):  # answered from the entry while the read waits
        assert await asyncio.wait_for(ring.identify(key), 1) is not None
    reading = ring._lookups[digest]  # one read under way for all three
    gate.set()
    assert await reading is None
    assert len(reads) == 2
    assert await ring.identify(key) is None
