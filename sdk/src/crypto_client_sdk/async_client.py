"""The asynchronous twin of `Client`, on `httpx.AsyncClient`: the same requests, parsing and
paging (all in `_protocol`); only sending and sleeping are awaited."""

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import httpx

from crypto_client_sdk import _protocol as protocol
from crypto_client_sdk import frames
from crypto_client_sdk._stream import STREAM_PATH, PriceStream
from crypto_client_sdk.client import DEFAULT_TIMEOUT_SECONDS, http_headers
from crypto_client_sdk.models import Bucket, Candle, Coverage, LatestPrice, Price, QualityDay, Settlement

if TYPE_CHECKING:
    import pandas
    import polars

T = TypeVar("T")


class AsyncRows(Generic[T]):
    """Rows of a paged endpoint, fetched page by page as they are iterated (`async for`)."""

    def __init__(self, walk: Callable[[], AsyncIterator[T]], row_type: type[T]) -> None:
        self._walk = walk
        self.row_type = row_type

    def __aiter__(self) -> AsyncIterator[T]:
        return self._walk()

    async def collect(self) -> list[T]:
        return [row async for row in self]

    async def to_pandas(self) -> "pandas.DataFrame":
        return frames.to_pandas(await self.collect(), self.row_type)

    async def to_polars(self) -> "polars.DataFrame":
        return frames.to_polars(await self.collect(), self.row_type)


class AsyncClient:
    """`async with AsyncClient("http://127.0.0.1:8000") as client: ...`"""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retry: protocol.RetryPolicy | None = None,
        page_size: int = protocol.PAGE_LIMIT,
    ) -> None:
        self.retry = retry or protocol.RetryPolicy()
        self.page_size = page_size
        self._http = httpx.AsyncClient(base_url=base_url, headers=http_headers(api_key), timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _get(self, url: str, params: protocol.Params | None = None) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.get(url, params=params)
            except httpx.TransportError as exc:
                wait = self.retry.after_no_answer(exc, url, attempt)
            else:
                answer = self.retry.after_answer(
                    response.status_code, response.headers, response.content, str(response.url), attempt
                )
                if answer is None:
                    return response
                wait = answer
            await asyncio.sleep(wait)
            attempt += 1

    async def _json(self, path: str, params: protocol.Params) -> Any:
        return protocol.decode_json((await self._get(path, params)).content)

    async def _pages(self, request: protocol.Paged[T]) -> AsyncIterator[T]:
        url: str | None = request.path
        params: protocol.Params | None = request.params
        while url is not None:
            response = await self._get(url, params)
            for row in request.parse(protocol.decode_json(response.content)):
                yield row
            url, params = protocol.next_link(response.headers.get("link")), None

    def _rows(self, request: protocol.Paged[T], row_type: type[T]) -> AsyncRows[T]:
        return AsyncRows(lambda: self._pages(request), row_type)

    def prices(self, ticker: str, from_ts: int | None = None, to_ts: int | None = None) -> AsyncRows[Price]:
        return self._rows(protocol.prices_request(ticker, from_ts, to_ts, self.page_size), Price)

    async def latest(self, ticker: str) -> LatestPrice:
        return protocol.latest_of(await self._json("/prices/latest", protocol.latest_params(ticker)))

    def candles(
        self, ticker: str, interval: str, from_ts: int | None = None, to_ts: int | None = None
    ) -> AsyncRows[Candle]:
        return self._rows(protocol.candles_request(ticker, interval, from_ts, to_ts, self.page_size), Candle)

    def resample(
        self,
        ticker: str,
        interval: str,
        from_ts: int | None = None,
        to_ts: int | None = None,
        fill: str = "none",
    ) -> AsyncRows[Bucket]:
        return self._rows(
            protocol.resample_request(ticker, interval, from_ts, to_ts, fill, self.page_size), Bucket
        )

    async def coverage(self, ticker: str, from_ts: int | None = None, to_ts: int | None = None) -> Coverage:
        pages = [
            page
            async for page in self._pages(protocol.coverage_request(ticker, from_ts, to_ts, self.page_size))
        ]
        return protocol.coverage_of(pages)

    def quality(
        self, ticker: str, from_ts: int | None = None, to_ts: int | None = None
    ) -> AsyncRows[QualityDay]:
        return self._rows(protocol.quality_request(ticker, from_ts, to_ts), QualityDay)

    def settlements(
        self,
        ticker: str,
        since: datetime.date | str | None = None,
        until: datetime.date | str | None = None,
    ) -> AsyncRows[Settlement]:
        return self._rows(protocol.settlements_request(ticker, since, until), Settlement)

    async def stream(
        self, tickers: Iterable[str] | str, last_event_id: int | str | None = None
    ) -> AsyncIterator[Price]:
        """As `Client.stream`."""
        state = PriceStream(tickers, last_event_id, self.retry)
        timeout = httpx.Timeout(self._http.timeout.connect, read=state.READ_TIMEOUT_SECONDS)
        while True:
            try:
                async with self._http.stream(
                    "GET",
                    STREAM_PATH,
                    params=state.params,
                    headers=state.headers(),
                    timeout=timeout,
                ) as response:
                    if response.status_code != 200:
                        wait = state.refused(
                            response.status_code, response.headers, await response.aread(), str(response.url)
                        )
                        await asyncio.sleep(wait)
                        continue
                    state.opened()
                    async for line in response.aiter_lines():
                        if (price := state.feed(line)) is not None:
                            yield price
            except httpx.TransportError:
                pass
            await asyncio.sleep(state.lost())
