"""Deribit's connection cap, shared by every process of a host.

Deribit refuses the 33rd simultaneous connection from one IP (HTTP requests and WebSockets
together) with a bare HTTP 429. With a broker configured, the processes of a deployment share
one budget in Redis: a counting semaphore whose holders are members of a sorted set scored by
their lease's expiry. Acquiring, renewing and releasing are each one Lua script, so they are
atomic; a holder that dies without releasing (`kill -9`) stops renewing, and its slot comes
back once its lease expires. Time is Redis's own clock (`TIME`), so the hosts' clocks do not
matter (the scheme of DistributedLock's RedisSemaphorePrimitive and of
asyncio-advanced-semaphores: members scored by expiry, the expired purged before counting).
"""

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from crypto_client.clients.deribit.errors import TransientDeribitError

log = structlog.get_logger(__name__)

LEASE_SECONDS = 10.0
_POLL_SECONDS = (0.02, 0.2)

# KEYS[1]: the holders' sorted set. ARGV: limit, lease ms, holder id. 1 when acquired.
_ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# ARGV: lease ms, holder id. 0 when the lease had already expired (its slot may be taken).
_RENEW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not expiry or tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Counts only live leases, without changing anything.
_COUNT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


def budget_key(url: str) -> str:
    """One budget per Deribit endpoint (host and port): its HTTP and WebSocket URLs share it."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    return f"crypto-client:deribit-connections:{parts.hostname}:{port}"


class SharedConnectionBudget:
    """At most `limit` connections to one Deribit endpoint among every process that shares
    this Redis. Hold a `lease()` for as long as a connection is open."""

    def __init__(
        self, redis_url: str, deribit_url: str, limit: int, *, lease_seconds: float = LEASE_SECONDS
    ) -> None:
        self.limit = limit
        self.key = budget_key(deribit_url)
        self._lease_ms = round(lease_seconds * 1000)
        self._redis = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._count = self._redis.register_script(_COUNT)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def held(self) -> int:
        """How many leases are live now, across every process."""
        return int(await self._count(keys=[self.key]))

    @contextlib.asynccontextmanager
    async def lease(self, wait_seconds: float) -> AsyncIterator[None]:
        """One slot, renewed while held and released on exit. Raises a transient error when
        no slot frees up within `wait_seconds`, or Redis cannot be reached."""
        holder = uuid.uuid4().hex
        await self._take(holder, wait_seconds)
        renewing = asyncio.create_task(self._keep(holder))
        try:
            yield
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            with contextlib.suppress(RedisError, OSError):
                await self._redis.zrem(self.key, holder)

    async def _take(self, holder: str, wait_seconds: float) -> None:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                if await self._acquire(keys=[self.key], args=[self.limit, self._lease_ms, holder]):
                    return
            except (RedisError, OSError) as exc:
                raise TransientDeribitError(
                    f"the shared Deribit connection budget is unreachable (CELERY_BROKER_URL): {exc}"
                ) from exc
            if time.monotonic() >= deadline:
                raise TransientDeribitError(
                    f"all {self.limit} Deribit connections of the shared budget stayed in use "
                    f"for {wait_seconds:g} s (DERIBIT_MAX_CONNECTIONS)"
                )
            await asyncio.sleep(random.uniform(*_POLL_SECONDS))

    async def _keep(self, holder: str) -> None:
        """Renew the lease a few times per lease period, so only a dead holder's expires."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                renewed = await self._renew(keys=[self.key], args=[self._lease_ms, holder])
            except (RedisError, OSError) as exc:
                log.warning("could not renew a Deribit connection lease", key=self.key, cause=str(exc))
                continue
            if not renewed:
                log.warning("a Deribit connection lease expired while held", key=self.key)
                return
