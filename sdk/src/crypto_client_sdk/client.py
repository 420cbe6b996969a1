"""The synchronous client, on `httpx.Client`."""

import datetime
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import httpx

from crypto_client_sdk import _protocol as protocol
from crypto_client_sdk import frames
from crypto_client_sdk._stream import STREAM_PATH, PriceStream
from crypto_client_sdk.models import Bucket, Candle, Coverage, LatestPrice, Price, QualityDay, Settlement

if TYPE_CHECKING:
    import pandas
    import polars

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 30.0


def http_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Rows(Generic[T]):
    """Rows of a paged endpoint, fetched page by page as they are iterated; each iteration
    walks the pages afresh."""

    def __init__(self, walk: Callable[[], Iterator[T]], row_type: type[T]) -> None:
        self._walk = walk
        self.row_type = row_type

    def __iter__(self) -> Iterator[T]:
        return self._walk()

    def to_pandas(self) -> "pandas.DataFrame":
        return frames.to_pandas(self, self.row_type)

    def to_polars(self) -> "polars.DataFrame":
        return frames.to_polars(self, self.row_type)


class Client:
    """`Client("http://127.0.0.1:8000", api_key=None)`; use it in a `with` block (or `close()`)."""

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
        self._http = httpx.Client(base_url=base_url, headers=http_headers(api_key), timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _get(self, url: str, params: protocol.Params | None = None) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.get(url, params=params)
            except httpx.TransportError as exc:
                wait = self.retry.after_no_answer(exc, url, attempt)
            else:
                answer = self.retry.after_answer(
                    response.status_code, response.headers, response.content, str(response.url), attempt
                )
                if answer is None:
                    return response
                wait = answer
            time.sleep(wait)
            attempt += 1

    def _json(self, path: str, params: protocol.Params) -> Any:
        return protocol.decode_json(self._get(path, params).content)

    def _pages(self, request: protocol.Paged[T]) -> Iterator[Iterable[T]]:
        url: str | None = request.path
        params: protocol.Params | None = request.params
        while url is not None:
            response = self._get(url, params)
            yield request.parse(protocol.decode_json(response.content))
            # The link carries the whole query of the next page.
            url, params = protocol.next_link(response.headers.get("link")), None

    def _rows(self, request: protocol.Paged[T], row_type: type[T]) -> Rows[T]:
        # Rows are handed on by C (chain), not by resuming a generator once per row.
        return Rows(lambda: itertools.chain.from_iterable(self._pages(request)), row_type)

    def prices(self, ticker: str, from_ts: int | None = None, to_ts: int | None = None) -> Rows[Price]:
        """Every stored price of `ticker` with from_ts <= ts <= to_ts, oldest first."""
        return self._rows(protocol.prices_request(ticker, from_ts, to_ts, self.page_size), Price)

    def latest(self, ticker: str) -> LatestPrice:
        return protocol.latest_of(self._json("/prices/latest", protocol.latest_params(ticker)))

    def candles(
        self, ticker: str, interval: str, from_ts: int | None = None, to_ts: int | None = None
    ) -> Rows[Candle]:
        return self._rows(protocol.candles_request(ticker, interval, from_ts, to_ts, self.page_size), Candle)

    def resample(
        self,
        ticker: str,
        interval: str,
        from_ts: int | None = None,
        to_ts: int | None = None,
        fill: str = "none",
    ) -> Rows[Bucket]:
        return self._rows(
            protocol.resample_request(ticker, interval, from_ts, to_ts, fill, self.page_size), Bucket
        )

    def coverage(self, ticker: str, from_ts: int | None = None, to_ts: int | None = None) -> Coverage:
        pages = self._pages(protocol.coverage_request(ticker, from_ts, to_ts, self.page_size))
        return protocol.coverage_of([body for page in pages for body in page])

    def quality(self, ticker: str, from_ts: int | None = None, to_ts: int | None = None) -> Rows[QualityDay]:
        return self._rows(protocol.quality_request(ticker, from_ts, to_ts), QualityDay)

    def settlements(
        self,
        ticker: str,
        since: datetime.date | str | None = None,
        until: datetime.date | str | None = None,
    ) -> Rows[Settlement]:
        """Daily settlement prices with since <= date <= until (`from` and `to` of the API)."""
        return self._rows(protocol.settlements_request(ticker, since, until), Settlement)

    def stream(self, tickers: Iterable[str] | str, last_event_id: int | str | None = None) -> Iterator[Price]:
        """Prices as they are stored, each with its `event_id`, forever: a lost connection (or
        a restarted server) is reconnected with `Last-Event-ID`, so no row is missed or repeated."""
        state = PriceStream(tickers, last_event_id, self.retry)
        timeout = httpx.Timeout(self._http.timeout.connect, read=state.READ_TIMEOUT_SECONDS)
        while True:
            try:
                with self._http.stream(
                    "GET",
                    STREAM_PATH,
                    params=state.params,
                    headers=state.headers(),
                    timeout=timeout,
                ) as response:
                    if response.status_code != 200:
                        wait = state.refused(
                            response.status_code, response.headers, response.read(), str(response.url)
                        )
                        time.sleep(wait)
                        continue
                    state.opened()
                    for line in response.iter_lines():
                        if (price := state.feed(line)) is not None:
                            yield price
            except httpx.TransportError:
                pass
            time.sleep(state.lost())
