"""An async client for Deribit's public JSON-RPC API (the few methods this service needs)."""

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from itertools import count
from typing import Any, Literal, TypeVar

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from crypto_client import __version__
from crypto_client.clients.errors import (
    DeribitError,
    PermanentDeribitError,
    RateLimitedError,
    RetriesExhaustedError,
    TransientDeribitError,
)
from crypto_client.config import Settings

log = structlog.get_logger(__name__)

# JSON-RPC error codes that Deribit documents as "wait and try again".
RETRYABLE_RPC_CODES = frozenset({10028, 10040, 10041, 11051, 13028, 13888})
TOO_MANY_REQUESTS = 10028
_MAX_BACKOFF_SECONDS = 30.0

T = TypeVar("T")


class RpcError(BaseModel):
    code: int
    message: str = ""
    data: Any = None


class RpcEnvelope(BaseModel):
    """Deribit's response envelope. Fields are read by name; their order varies."""

    jsonrpc: Literal["2.0"]
    id: int | str | None = None
    result: Any = None
    error: RpcError | None = None
    usIn: int | None = None  # noqa: N815 - Deribit's field name
    usOut: int | None = None  # noqa: N815
    usDiff: int | None = None  # noqa: N815
    testnet: bool | None = None


def _exact_positive(value: object) -> Decimal:
    # Decimals come straight from the JSON text (parse_float=Decimal); strings, booleans and
    # non-finite or non-positive numbers are not prices.
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise ValueError("must be a JSON number")
    number = Decimal(value)
    if not number.is_finite() or number <= 0:
        raise ValueError("must be a positive finite number")
    return number


class IndexPriceResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index_price: Decimal
    estimated_delivery_price: Decimal

    @field_validator("index_price", "estimated_delivery_price", mode="plain")
    @classmethod
    def _check_number(cls, value: object) -> Decimal:
        return _exact_positive(value)


@dataclass(frozen=True, slots=True)
class IndexPrice:
    index_name: str
    price: Decimal
    estimated_delivery_price: Decimal
    server_time_us: int | None  # Deribit's `usOut`: when the server sent the price


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The outcome for one ticker of `fetch_many`: a price or the error that stopped it."""

    ticker: str
    price: IndexPrice | None = None
    error: DeribitError | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class DeribitClient:
    """One per process: it holds the HTTP connection pool. Use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        max_retries: int = 3,
        backoff_seconds: float = 0.5,
        max_concurrency: int = 20,
        use_post: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._max_retries = max_retries
        self._backoff_seconds = backoff_seconds
        self._backoff = wait_random_exponential(multiplier=backoff_seconds, max=_MAX_BACKOFF_SECONDS)
        self._use_post = use_post
        self._request_ids = count(1)
        self._concurrency = asyncio.Semaphore(max_concurrency)
        self._http = httpx.AsyncClient(
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            headers={"User-Agent": f"crypto-client/{__version__}", "Accept": "application/json"},
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> "DeribitClient":
        return cls(
            settings.deribit_rpc_url,
            timeout=settings.http_timeout_seconds,
            max_retries=settings.http_max_retries,
            backoff_seconds=settings.http_retry_backoff_seconds,
            max_concurrency=settings.http_max_concurrency,
        )

    async def __aenter__(self) -> "DeribitClient":
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get_index_price(self, index_name: str) -> IndexPrice:
        def parse(envelope: RpcEnvelope) -> IndexPrice:
            try:
                result = IndexPriceResult.model_validate(envelope.result)
            except ValidationError as exc:
                raise TransientDeribitError(
                    f"malformed get_index_price result: {_first_problem(exc)}"
                ) from None
            return IndexPrice(
                index_name=index_name,
                price=result.index_price,
                estimated_delivery_price=result.estimated_delivery_price,
                server_time_us=envelope.usOut,
            )

        return await self.call("public/get_index_price", {"index_name": index_name}, parse)

    async def get_index_price_names(self) -> list[str]:
        def parse(envelope: RpcEnvelope) -> list[str]:
            names = envelope.result
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise TransientDeribitError(
                    "malformed get_index_price_names result: expected a list of names"
                )
            return names

        return await self.call("public/get_index_price_names", {}, parse)

    async def get_time(self) -> int:
        """Deribit's clock, in milliseconds since the epoch."""

        def parse(envelope: RpcEnvelope) -> int:
            if isinstance(envelope.result, bool) or not isinstance(envelope.result, int):
                raise TransientDeribitError("malformed get_time result: expected an integer")
            return envelope.result

        return await self.call("public/get_time", {}, parse)

    async def fetch_many(self, tickers: Iterable[str]) -> list[FetchResult]:
        """The index price of every ticker, concurrently; one ticker's failure is its own."""

        async def fetch(ticker: str) -> FetchResult:
            try:
                return FetchResult(ticker, price=await self.get_index_price(ticker))
            except DeribitError as exc:
                return FetchResult(ticker, error=exc)

        return list(await asyncio.gather(*(fetch(ticker) for ticker in tickers)))

    async def call(self, method: str, params: Mapping[str, str], parse: Callable[[RpcEnvelope], T]) -> T:
        """Call `method` and `parse` its answer, retrying transient failures (a malformed
        result among them) with full-jitter exponential backoff."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientDeribitError),
            stop=stop_after_attempt(self._max_retries + 1),
            wait=self._wait,
            before_sleep=lambda state: self._log_retry(method, params, state),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return parse(await self._call_once(method, params))
        except TransientDeribitError as exc:
            attempts = self._max_retries + 1
            raise RetriesExhaustedError(
                f"{method} failed after {attempts} attempts: {exc}", attempts=attempts, last_error=exc
            ) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, TransientDeribitError) and error.retry_after is not None:
            return min(error.retry_after, _MAX_BACKOFF_SECONDS)
        wait = float(self._backoff(state))
        if isinstance(error, RateLimitedError):
            # Full jitter may draw ~0; a rate limit needs at least the exponential floor.
            floor = self._backoff_seconds * 2 ** (state.attempt_number - 1)
            wait = max(wait, min(floor, _MAX_BACKOFF_SECONDS))
        return wait

    def _log_retry(self, method: str, params: Mapping[str, str], state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "deribit call failed, retrying",
            method=method,
            ticker=params.get("index_name"),
            attempt=state.attempt_number,
            max_attempts=self._max_retries + 1,
            wait_seconds=round(state.upcoming_sleep, 3),
            cause=str(error),
        )

    async def _call_once(self, method: str, params: Mapping[str, str]) -> RpcEnvelope:
        async with self._concurrency:
            try:
                if self._use_post:
                    payload = {
                        "jsonrpc": "2.0",
                        "id": next(self._request_ids),
                        "method": method,
                        "params": dict(params),
                    }
                    response = await self._http.post(self._base_url, json=payload)
                else:
                    response = await self._http.get(f"{self._base_url}/{method}", params=params)
            except httpx.TimeoutException as exc:
                raise TransientDeribitError(f"timed out ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:
                raise TransientDeribitError(f"connection failed: {type(exc).__name__}: {exc}") from exc
        return _parse(method, response)


def _parse(method: str, response: httpx.Response) -> RpcEnvelope:
    status = response.status_code
    try:
        body = json.loads(response.content, parse_float=Decimal, parse_constant=_reject_constant)
        envelope = RpcEnvelope.model_validate(body)
    except (ValueError, ValidationError):
        envelope = None

    # A JSON-RPC error object decides, whatever the HTTP status; the status decides otherwise.
    if envelope is not None and envelope.error is not None:
        error = envelope.error
        message = f"{method}: Deribit error {error.code} {error.message}"
        if error.data is not None:
            message += f" ({error.data})"
        if error.code == TOO_MANY_REQUESTS:
            raise RateLimitedError(message, retry_after=_retry_after(response))
        if error.code in RETRYABLE_RPC_CODES or status >= 500:
            raise TransientDeribitError(message, retry_after=_retry_after(response))
        raise PermanentDeribitError(message, code=error.code, http_status=status)
    if status == 429:
        raise RateLimitedError(f"{method}: HTTP 429 Too Many Requests", retry_after=_retry_after(response))
    if status >= 500:
        raise TransientDeribitError(f"{method}: HTTP {status} from Deribit")
    if status >= 400:
        raise PermanentDeribitError(f"{method}: HTTP {status} from Deribit", http_status=status)
    if envelope is None or "result" not in body:
        raise TransientDeribitError(f"{method}: malformed response (HTTP {status}, not a JSON-RPC result)")
    return envelope


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "result"
    return f"{where}: {error['msg']}"
