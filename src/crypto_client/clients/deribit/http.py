"""Deribit over HTTP: `GET /api/v2/public/<method>` with retries, as a `PriceSource`."""

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from crypto_client import __version__, metrics
from crypto_client.clients.deribit.budget import SharedConnectionBudget
from crypto_client.clients.deribit.errors import (
    DeribitError,
    PermanentDeribitError,
    RateLimitedError,
    RetriesExhaustedError,
    TransientDeribitError,
)
from crypto_client.clients.deribit.rpc import (
    CHART_RANGES,
    RpcEnvelope,
    decode_envelope,
    error_for,
    parse_chart_data,
    parse_index_price,
    server_time_us,
)
from crypto_client.clients.source import DeadlinePassedError, FetchResult, HistoryPoint, Observation
from crypto_client.origin import SIMULATOR_HEADER, origin_of

log = structlog.get_logger(__name__)

MAX_BACKOFF_SECONDS = 30.0
# A chart answer full of bad points is logged with this many of them, and their count.
_SKIPPED_POINTS_LOGGED = 10
_KEEPALIVE_SECONDS = 3.0

T = TypeVar("T")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class DeribitHttpClient:
    """One per process: it holds the HTTP connection pool. Use as an async context manager.

    Open connections never exceed `max_connections` in this process, nor, with a shared
    `budget`, the budget's limit across every process that shares it: then each request holds
    a lease while its connection is open, and closes its connection when done (an idle
    keep-alive connection would hold a slot another process may need).
    """

    history_ranges = CHART_RANGES

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        max_retries: int = 3,
        backoff_seconds: float = 0.5,
        max_concurrency: int = 20,
        max_connections: int = 24,
        budget: SharedConnectionBudget | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._budget = budget
        open_at_most = min(max_concurrency, max_connections)
        self._max_retries = max_retries
        self._backoff_seconds = backoff_seconds
        self._backoff = wait_random_exponential(multiplier=backoff_seconds, max=MAX_BACKOFF_SECONDS)
        self._concurrency = asyncio.Semaphore(open_at_most)
        # Whether the last answer came from this project's simulator; None before any answer.
        self._simulator: bool | None = None
        self._http = httpx.AsyncClient(
            timeout=timeout,
            # Idle connections are dropped before a server would close them (uvicorn, and so the
            # simulator, after 5 s): reusing one the server is closing fails the request.
            limits=httpx.Limits(
                max_connections=open_at_most,
                max_keepalive_connections=0 if budget is not None else open_at_most,
                keepalive_expiry=_KEEPALIVE_SECONDS,
            ),
            headers={"User-Agent": f"crypto-client/{__version__}", "Accept": "application/json"},
            transport=transport,
        )

    async def __aenter__(self) -> "DeribitHttpClient":
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._budget is not None:
            await self._budget.aclose()

    @property
    def answered(self) -> bool:
        """Whether the server has answered yet (so that `origin` is its own word)."""
        return self._simulator is not None

    @property
    def origin(self) -> str:
        """The origin of this client's prices (see `crypto_client.origin`)."""
        return origin_of(self._base_url, simulator=bool(self._simulator))

    async def identify(self) -> bool:
        """Ask the server once (`public/test`, Deribit's own liveness probe) so that `origin`
        is the server's word; False when it did not answer."""
        with contextlib.suppress(DeribitError):
            await self._call_once("public/test", {})
        return self.answered

    async def get_index_price(self, index_name: str) -> Observation:
        sent_at = time.time()

        def parse(envelope: RpcEnvelope) -> Observation:
            return Observation(
                ticker=index_name,
                price=parse_index_price(envelope.result),
                server_time_us=server_time_us(envelope.usOut),
                sent_at=sent_at,
                received_at=time.time(),
            )

        return await self.call("public/get_index_price", {"index_name": index_name}, parse)

    async def fetch_history(self, ticker: str, range_name: str) -> list[HistoryPoint]:
        """Deribit's own history of `ticker` over `range_name` (`get_index_chart_data`)."""

        def parse(envelope: RpcEnvelope) -> list[HistoryPoint]:
            data = parse_chart_data(envelope.result)
            if data.skipped:
                log.warning(
                    "history points skipped",
                    ticker=ticker,
                    range=range_name,
                    skipped=len(data.skipped),
                    kept=len(data.points),
                    points=data.skipped[:_SKIPPED_POINTS_LOGGED],
                )
            return [HistoryPoint(ts_ms, price) for ts_ms, price in data.points]

        params = {"index_name": ticker, "range": range_name}
        return await self.call("public/get_index_chart_data", params, parse)

    async def fetch_prices(
        self, tickers: Sequence[str], *, deadline: float | None = None
    ) -> list[FetchResult]:
        """The index price of every ticker, concurrently; one ticker's failure is its own.
        Requests still running (or waiting to retry) at `deadline` are cancelled."""

        async def fetch(ticker: str) -> FetchResult:
            try:
                return FetchResult(ticker, observation=await self.get_index_price(ticker))
            except RetriesExhaustedError as exc:
                return FetchResult(ticker, error=exc, attempts=exc.attempts)
            except DeribitError as exc:
                return FetchResult(ticker, error=exc)
            except Exception as exc:
                # An answer nothing above foresaw still costs only its own ticker, never the tick.
                log.exception("unexpected error fetching a price", ticker=ticker)
                return FetchResult(ticker, error=exc)

        fetches = [asyncio.create_task(fetch(ticker)) for ticker in tickers]
        try:
            if fetches:
                await asyncio.wait(
                    fetches, timeout=None if deadline is None else max(0.0, deadline - time.time())
                )
        finally:
            unanswered = [task for task in fetches if not task.done()]
            for task in unanswered:
                task.cancel()
            await asyncio.gather(*unanswered, return_exceptions=True)
        return [
            FetchResult(ticker, error=DeadlinePassedError(f"not answered by {deadline:.3f}"))
            if task.cancelled()
            else task.result()
            for ticker, task in zip(tickers, fetches, strict=True)
        ]

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
            return min(error.retry_after, MAX_BACKOFF_SECONDS)
        wait = float(self._backoff(state))
        if isinstance(error, RateLimitedError):
            # Full jitter may draw ~0; a rate limit needs at least the exponential floor.
            floor = self._backoff_seconds * 2 ** (state.attempt_number - 1)
            wait = max(wait, min(floor, MAX_BACKOFF_SECONDS))
        return wait

    def _log_retry(self, method: str, params: Mapping[str, str], state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, DeribitError):
            metrics.DERIBIT_RETRIES.labels(method, _outcome(error)).inc()
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
            started = time.perf_counter()
            try:
                async with self._connection_slot():
                    try:
                        response = await self._http.get(f"{self._base_url}/{method}", params=params)
                    except httpx.TimeoutException as exc:
                        raise TransientDeribitError(f"timed out ({type(exc).__name__})") from exc
                    except httpx.TransportError as exc:
                        raise TransientDeribitError(
                            f"connection failed: {type(exc).__name__}: {exc}"
                        ) from exc
                self._simulator = SIMULATOR_HEADER in response.headers
                envelope = _check(method, response)
            except DeribitError as exc:
                _observe(method, _outcome(exc), started)
                raise
            _observe(method, "ok", started)
            return envelope

    def _connection_slot(self) -> AbstractAsyncContextManager[None]:
        if self._budget is None:
            return contextlib.nullcontext()
        return self._budget.lease(wait_seconds=self._timeout)


def _outcome(error: DeribitError) -> str:
    if isinstance(error, RateLimitedError):
        return "rate_limited"
    return "transient" if isinstance(error, TransientDeribitError) else "permanent"


def _observe(method: str, outcome: str, started: float) -> None:
    metrics.DERIBIT_REQUEST_DURATION.labels(method, outcome).observe(time.perf_counter() - started)


def _check(method: str, response: httpx.Response) -> RpcEnvelope:
    status = response.status_code
    envelope = decode_envelope(response.content)
    # A JSON-RPC error object decides, whatever the HTTP status; the status decides otherwise.
    if envelope is not None and envelope.error is not None:
        raise error_for(method, envelope.error, http_status=status, retry_after=_retry_after(response))
    if status == 429:
        # Without a JSON-RPC error, a 429 is Deribit's cap of 32 connections per IP: wait, retry.
        raise RateLimitedError(
            f"{method}: HTTP 429 with no JSON-RPC error (the cap of simultaneous connections per IP)",
            retry_after=_retry_after(response),
        )
    if status >= 500:
        raise TransientDeribitError(f"{method}: HTTP {status} from Deribit")
    if status >= 400:
        raise PermanentDeribitError(f"{method}: HTTP {status} from Deribit", http_status=status)
    if envelope is None:
        raise TransientDeribitError(f"{method}: malformed response (HTTP {status}, not a JSON-RPC result)")
    return envelope
