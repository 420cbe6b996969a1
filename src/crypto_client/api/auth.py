"""Who may ask what: API keys (opt-in, `API_KEYS_REQUIRED`), the `/metrics` token, and the
quotas and caps each caller is held to (`api/quotas.py`), as one plain ASGI middleware in front
of every route, so that a route added later is guarded without knowing it.

Keys are random 32-byte tokens; the database holds only their sha256. A key is looked up by
its hash (a unique-index seek) and what was found is compared with `hmac.compare_digest`, also
when nothing was found (against a dummy), so a wrong key and a right one take the same work.
A lookup is cached for `KEY_CACHE_SECONDS`: a revoked key stops working within that on every
API process. A key in use is read again in the background halfway through, so that under load
no request waits for the database when its entry expires. The API's database connections are
read-only; "last used" is kept in memory and written every `LAST_USED_FLUSH_SECONDS` (and at
shutdown) by a one-connection writer on `DATABASE_URL`, never once per request.
"""

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Message, Receive, Scope, Send

from crypto_client.api.client_address import client_address
from crypto_client.api.middleware import HttpMiddleware
from crypto_client.api.quotas import ConcurrencyCaps, Quotas, Verdict, request_cost
from crypto_client.config import Settings
from crypto_client.db import api_keys
from crypto_client.db.api_keys import ApiKeyRow
from crypto_client.db.engine import create_engine, is_database_unavailable
from crypto_client.setting_values import Network, parse_networks

log = structlog.get_logger(__name__)

KEY_PREFIX = "cck_"
_KEY_PATTERN = re.compile(r"cck_[A-Za-z0-9_-]{43}")
KEY_CACHE_SECONDS = 2.0
# A key in use is read again in the background once its entry is this old.
_KEY_REFRESH_SECONDS = KEY_CACHE_SECONDS / 2
_KEY_CACHE_ENTRIES = 10_000
LAST_USED_FLUSH_SECONDS = 60.0
_LOOKUP_TIMEOUT_SECONDS = 2.0
_NO_KEY = bytes(32)  # what a key that is not stored is compared with

OPEN_PATHS = frozenset({"/health", "/livez", "/readyz"})
# The dashboard must load to ask for a key; the API's description is no data either.
_STATIC_PATHS = frozenset({"/", "/docs", "/openapi.json"})
_STATIC_PREFIX = "/static/"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


# The two ways to send a key, as the API's OpenAPI document declares them (either will do).
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "bearerKey": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer KEY`"},
    "headerKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "`X-API-Key: KEY`"},
}


def with_key_security(document: dict[str, Any]) -> dict[str, Any]:
    """The API's OpenAPI document when keys are required: every operation needs a key in
    either header, the open paths none, and a refusal is documented as a 401."""
    document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    document["security"] = [{name: []} for name in SECURITY_SCHEMES]
    refused = {
        "description": "No key, a malformed one, or one unknown or revoked.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
    }
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            if path in OPEN_PATHS:
                operation["security"] = []
            else:
                operation.setdefault("responses", {}).setdefault("401", refused)
    return document


class KeyRing:
    """Looks keys up (cached briefly) and remembers when each was last used."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # digest -> (row, read again after, usable until): monotonic times
        self._cache: dict[bytes, tuple[ApiKeyRow | None, float, float]] = {}
        self._lookups: dict[bytes, asyncio.Task[ApiKeyRow | None]] = {}
        self.used: dict[str, int] = {}

    async def identify(self, presented: str) -> ApiKeyRow | None:
        """The stored key `presented` is, or None (unknown or revoked)."""
        digest = key_digest(presented)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is None or cached[2] <= now:
            # Shielded: a request whose client leaves does not cancel the others' lookup.
            row = await asyncio.shield(self._lookup_once(digest))
        else:
            row = cached[0]
            if cached[1] <= now:  # read it again meanwhile: under load no request waits for it
                self._lookup_once(digest)
        found = self.check(row, digest)
        if found is not None:
            self.used[found.name] = int(time.time())
        return found

    @staticmethod
    def check(row: ApiKeyRow | None, digest: bytes) -> ApiKeyRow | None:
        """`row` if its hash is `digest`: one constant-time comparison whether or not a row
        was found."""
        matches = hmac.compare_digest(row.key_hash if row is not None else _NO_KEY, digest)
        return row if row is not None and matches else None

    def _lookup_once(self, digest: bytes) -> "asyncio.Task[ApiKeyRow | None]":
        """The lookup of `digest` in flight, started if there is none: when an entry expires
        under load, every request of that key in flight would otherwise query at once."""
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = self._lookups[digest] = asyncio.create_task(self._read(digest))
            # A background read that failed is nobody's to report: the entry expires, and the
            # next request's own lookup answers 503 if the database is still out of reach.
            lookup.add_done_callback(lambda done: done.cancelled() or done.exception())
        return lookup

    async def _read(self, digest: bytes) -> ApiKeyRow | None:
        started = time.monotonic()  # the row is no older than this: revocation is seen in time
        try:
            row = await self._lookup(digest)
        finally:
            del self._lookups[digest]
        if len(self._cache) >= _KEY_CACHE_ENTRIES:  # a flood of made-up keys: start afresh
            self._cache.clear()
        self._cache[digest] = (row, started + _KEY_REFRESH_SECONDS, started + KEY_CACHE_SECONDS)
        return row

    async def _lookup(self, digest: bytes) -> ApiKeyRow | None:
        async with asyncio.timeout(_LOOKUP_TIMEOUT_SECONDS), self._engine.connect() as connection:
            return await api_keys.find_key(connection, digest)


class Access:
    """The state of the guard for one API process (made in the app's lifespan)."""

    def __init__(self, settings: Settings, read_engine: AsyncEngine, quota_storage_url: str) -> None:
        self.keys_required = settings.api_keys_required
        self.dashboard_open = settings.api_dashboard_open
        self.metrics_digest = (
            key_digest(settings.metrics_token.get_secret_value()) if settings.metrics_token else None
        )
        self.trusted_proxies: tuple[Network, ...] = parse_networks(settings.forwarded_allow_ips)
        self.keys = KeyRing(read_engine)
        self.quotas = Quotas(quota_storage_url, settings.api_rate_limit)
        self.caps = ConcurrencyCaps(settings.api_key_max_streams, settings.api_key_max_exports)
        # Where "last used" is written: the writers' database (none when only a replica is set).
        self._writer_url = settings.listen_url

    def is_open(self, path: str) -> bool:
        if path in OPEN_PATHS:
            return True
        return self.dashboard_open and (path in _STATIC_PATHS or path.startswith(_STATIC_PREFIX))

    async def flush_last_used(self) -> None:
        if not self.keys.used or self._writer_url is None:
            return
        used, self.keys.used = self.keys.used, {}
        engine = create_engine(self._writer_url, pool_size=1)
        try:
            async with engine.begin() as connection:
                await api_keys.record_last_used(connection, used)
        except Exception as exc:
            for name, when in used.items():  # kept for the next flush
                self.keys.used[name] = max(when, self.keys.used.get(name, 0))
            log.warning("could not record when API keys were last used", error=repr(exc))
        finally:
            await engine.dispose()

    @asynccontextmanager
    async def running(self) -> AsyncIterator["Access"]:
        async def flush_periodically() -> None:
            while True:
                await asyncio.sleep(LAST_USED_FLUSH_SECONDS)
                await self.flush_last_used()

        flusher = asyncio.create_task(flush_periodically(), name="api-keys-last-used")
        try:
            yield self
        finally:
            flusher.cancel()
            await self.flush_last_used()


def _credentials(scope: Scope) -> tuple[str | None, str | None]:
    """The `Authorization` and `X-API-Key` headers (one pass over the request's headers)."""
    authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
    return authorization, api_key


def _bearer(authorization: str | None) -> str | None:
    """The token of `Bearer TOKEN`; "" for another scheme (a malformed key), None without one."""
    if authorization is None:
        return None
    scheme, _, credentials = authorization.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="crypto-client"'}
_HOW = "send it as `Authorization: Bearer KEY` or `X-API-Key: KEY`"


def _too_many(verdict: Verdict) -> dict[str, str]:
    return {
        "Retry-After": str(verdict.retry_after),
        "RateLimit-Policy": verdict.policy,
        "RateLimit": f"limit={verdict.limit}, remaining=0, reset={verdict.retry_after}",
    }


class AccessGuard(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        access: Access = scope["app"].state.access
        path: str = scope["path"]
        if access.is_open(path):
            await self.app(scope, receive, send)
            return
        authorization, api_key = _credentials(scope)
        if path == "/metrics" and access.metrics_digest is not None:
            token = _bearer(authorization) or ""
            if not hmac.compare_digest(key_digest(token), access.metrics_digest):
                await _answer(send, 401, "/metrics needs the METRICS_TOKEN as a bearer token", _CHALLENGE)
                return
            await self.app(scope, receive, send)
            return

        if access.keys_required:
            presented = _bearer(authorization) if authorization is not None else api_key
            if presented is None:
                await _answer(send, 401, f"an API key is required: {_HOW}", _CHALLENGE)
                return
            presented = presented.strip()
            if not _KEY_PATTERN.fullmatch(presented):
                await _answer(
                    send, 401, f"malformed API key: keys look like cck_ and 43 characters; {_HOW}", _CHALLENGE
                )
                return
            try:
                row = await access.keys.identify(presented)
            except Exception as exc:
                if not (is_database_unavailable(exc) or isinstance(exc, TimeoutError)):
                    raise
                log.warning("cannot check API keys: database unavailable", error=repr(exc))
                await _answer(send, 503, "the database is unavailable, try again shortly", {})
                return
            if row is None:
                await _answer(send, 401, "invalid API key (unknown or revoked)", _CHALLENGE)
                return
            identity, own_limit = "key:" + row.name, row.rate_limit
        else:
            identity, own_limit = "address:" + client_address(scope, access.trusted_proxies), None

        verdict = await access.quotas.charge(identity, own_limit, request_cost(path, scope["query_string"]))
        if verdict is not None and not verdict.allowed:
            detail = f"over the quota ({verdict.policy}): retry in {verdict.retry_after} s"
            await _answer(send, 429, detail, _too_many(verdict))
            return
        if verdict is not None:
            send = _with_header(send, b"ratelimit-policy", verdict.policy.encode("latin-1"))
        # Per key only: without keys, one address may be many users behind one NAT, and the
        # per-process caps bound what all of them hold.
        kind = access.caps.kind_of(path) if access.keys_required else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        with access.caps.holding(kind, identity) as allowed:
            if not allowed:
                detail = f"at most {access.caps.cap(kind)} open at once per API key: finish one first"
                await _answer(send, 429, detail, {"Retry-After": "1"})
                return
            await self.app(scope, receive, send)


def _with_header(send: Send, name: bytes, value: bytes) -> Send:
    """`send`, adding a header to the response (raw: cheaper than `MutableHeaders` per request)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (name, value)]
        await send(message)

    return sending
