"""Everything the sync and the async client share, free of I/O: the requests each method
makes, reading answers into typed objects, the `Link` to the next page, when and how long to
wait before a retry (`_stream.py` reads the event stream). The two clients only send and sleep."""

import datetime
import email.utils
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Generic, TypeVar

from crypto_client_sdk.errors import (
    CryptoClientError,
    InvalidRequest,
    NotFound,
    ProtocolError,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
)
from crypto_client_sdk.models import (
    Bucket,
    Candle,
    Coverage,
    Gap,
    LatestPrice,
    Price,
    QualityDay,
    Settlement,
)

T = TypeVar("T")

# The most rows (or candles, buckets, gaps) a page may hold: fewer round trips for a long walk.
PAGE_LIMIT = 10_000
RETRY_STATUSES = frozenset({429, 503})

Params = dict[str, str | int | list[str]]


def decode_json(content: bytes) -> Any:
    """JSON with every non-integer number a `Decimal` of its exact text."""
    try:
        return json.loads(content, parse_float=Decimal)
    except ValueError as exc:
        raise ProtocolError(f"the answer is not JSON: {content[:200]!r}") from exc


def exact(value: Any) -> Decimal:
    """A price from decoded JSON: a Decimal already, or an int for a literal without a point."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    raise ProtocolError(f"expected a number, got {value!r}")


def _optional_exact(value: Any) -> Decimal | None:
    return None if value is None else exact(value)


def price(row: Mapping[str, Any], event_id: int | None = None) -> Price:
    return Price(row["ticker"], exact(row["price"]), row["ts"], row["source"], event_id)


def prices_of(body: Any) -> Iterator[Price]:
    """The prices of a page, made one at a time as they are consumed: a page of rows is then
    never alive twice over, as dicts and as prices, and no price outlives its use long enough
    for the garbage collector to scan it again and again."""
    # The hot loop of a long walk, so built as cheaply as Python can: the tuple made directly
    # (no keyword handling), the conversion called only for the rare integer literal.
    new, kind, decimal = tuple.__new__, Price, Decimal
    if not isinstance(body, list):
        raise ProtocolError(f"not a list of prices: {body!r:.200}")
    try:
        for r in body:
            p = r["price"]
            exact_price = p if p.__class__ is decimal else exact(p)
            yield new(kind, (r["ticker"], exact_price, r["ts"], r["source"], None))
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"not a list of prices: {exc!r}") from exc


def latest_of(body: Any) -> LatestPrice:
    return LatestPrice(body["ticker"], exact(body["price"]), body["ts"], body["source"], body["age_seconds"])


def candles_of(body: Any) -> list[Candle]:
    return [
        Candle(
            c["ts"],
            exact(c["open"]),
            exact(c["high"]),
            exact(c["low"]),
            exact(c["close"]),
            c["count"],
            c["backfilled"],
            c.get("trade"),
        )
        for c in body
    ]


def buckets_of(body: Any) -> list[Bucket]:
    return [
        Bucket(
            b["ts"],
            _optional_exact(b.get("price")),
            b["count"],
            bool(b.get("filled", False)),
            b.get("backfilled", 0),
            b.get("trade"),
        )
        for b in body
    ]


def settlements_of(body: Any) -> list[Settlement]:
    return [Settlement(datetime.date.fromisoformat(s["date"]), exact(s["delivery_price"])) for s in body]


_QUALITY_FIELDS = ("day", "expected_slots", "stored_slots", "missing_slots", "completeness")


def quality_of(body: Any) -> list[QualityDay]:
    """The days of a `/quality` answer: a list of days, or an object holding them in `days`."""
    days = body["days"] if isinstance(body, Mapping) else body
    return [
        QualityDay(
            date=datetime.date.fromisoformat(d["day"]),
            expected_slots=d["expected_slots"],
            stored_slots=d["stored_slots"],
            missing_slots=d["missing_slots"],
            completeness=None if d["completeness"] is None else exact(d["completeness"]),
            figures={k: v for k, v in d.items() if k not in _QUALITY_FIELDS},
        )
        for d in days
    ]


def coverage_of(pages: Sequence[Any]) -> Coverage:
    """One coverage from its pages: the totals of the first, the gaps of all."""
    first = pages[0]
    return Coverage(
        ticker=first["ticker"],
        interval_seconds=first["interval_seconds"],
        from_ts=first["from_ts"],
        to_ts=first["to_ts"],
        expected_slots=first["expected_slots"],
        stored_slots=dict(first["stored_slots"]),
        missing_slots=first["missing_slots"],
        coverage=float(first["coverage"]),
        gaps=tuple(Gap(**gap) for page in pages for gap in page["gaps"]),
    )


@dataclass(frozen=True)
class Paged(Generic[T]):
    """A paged request: where it starts and how one page's JSON becomes rows."""

    path: str
    params: Params
    parse: Callable[[Any], Iterable[T]]


def _bounds(from_ts: int | None, to_ts: int | None) -> Params:
    params: Params = {}
    if from_ts is not None:
        params["from_ts"] = from_ts
    if to_ts is not None:
        params["to_ts"] = to_ts
    return params


def prices_request(ticker: str, from_ts: int | None, to_ts: int | None, limit: int) -> Paged[Price]:
    params = {"ticker": ticker, **_bounds(from_ts, to_ts), "limit": limit}
    return Paged("/prices/range", params, prices_of)


def candles_request(
    ticker: str, interval: str, from_ts: int | None, to_ts: int | None, limit: int
) -> Paged[Candle]:
    params = {"ticker": ticker, "interval": interval, **_bounds(from_ts, to_ts), "limit": limit}
    return Paged("/prices/candles", params, candles_of)


def resample_request(
    ticker: str, interval: str, from_ts: int | None, to_ts: int | None, fill: str, limit: int
) -> Paged[Bucket]:
    params = {
        "ticker": ticker,
        "interval": interval,
        **_bounds(from_ts, to_ts),
        "fill": fill,
        "limit": limit,
    }
    return Paged("/prices/resample", params, buckets_of)


def quality_request(ticker: str, from_ts: int | None, to_ts: int | None) -> Paged[QualityDay]:
    return Paged("/quality", {"ticker": ticker, **_bounds(from_ts, to_ts)}, quality_of)


def coverage_request(ticker: str, from_ts: int | None, to_ts: int | None, limit: int) -> Paged[Any]:
    """Pages of raw coverage bodies, which `coverage_of` joins."""
    params = {"ticker": ticker, **_bounds(from_ts, to_ts), "limit": limit}
    return Paged("/coverage", params, lambda body: [body])


def settlements_request(
    ticker: str, since: datetime.date | str | None, until: datetime.date | str | None
) -> Paged[Settlement]:
    params: Params = {"ticker": ticker}
    if since is not None:
        params["from"] = str(since)
    if until is not None:
        params["to"] = str(until)
    return Paged("/settlements", params, settlements_of)


def latest_params(ticker: str) -> Params:
    return {"ticker": ticker}


_LINK = re.compile(r"<([^>]*)>((?:\s*;\s*[^;,]+)*)")
_REL_NEXT = re.compile(r"""(?:^|;)\s*rel\s*=\s*(?:"([^"]*)"|([^\s;"]+))""")


def next_link(header: str | None) -> str | None:
    """The target of the `rel="next"` link of an RFC 8288 `Link` header, if any."""
    if not header:
        return None
    for target, parameters in _LINK.findall(header):
        for quoted, bare in _REL_NEXT.findall(parameters):
            if "next" in (quoted or bare).lower().split():
                return str(target)
    return None


def _detail(content: bytes) -> str | None:
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:500] or None
    if isinstance(body, Mapping) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    return None


def retry_after_seconds(header: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds to wait: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if header is None:
        return None
    value = header.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def error_for(status: int, headers: Mapping[str, str], content: bytes, url: str) -> CryptoClientError:
    detail = _detail(content)
    message = f"{status} from {url}" + (f": {detail}" if detail else "")
    if status == 404:
        return NotFound(message, status=status, detail=detail)
    if status in (400, 422):
        return InvalidRequest(message, status=status, detail=detail)
    if status in (401, 403):
        return Unauthorized(message, status=status, detail=detail)
    retry_after = retry_after_seconds(headers.get("retry-after"))
    if status == 429:
        return RateLimited(message, status=status, detail=detail, retry_after=retry_after)
    if status == 503:
        return Unavailable(message, status=status, detail=detail, retry_after=retry_after)
    return ServerError(message, status=status, detail=detail)


@dataclass(frozen=True)
class RetryPolicy:
    """At most `max_retries` retries (None: no limit) of a call answered 429/503 or not
    answered. The wait is the server's `Retry-After` when it sends one, else `backoff_seconds`
    doubling up to `max_backoff_seconds`; a `Retry-After` beyond `max_wait_seconds` fails at
    once, since the caller would not want to hang that long unseen."""

    max_retries: int | None = 5
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 10.0
    max_wait_seconds: float = 60.0

    def _spent(self, attempt: int) -> bool:
        return self.max_retries is not None and attempt >= self.max_retries

    def backoff(self, attempt: int) -> float:
        return float(min(self.max_backoff_seconds, self.backoff_seconds * 2**attempt))

    def after_answer(
        self, status: int, headers: Mapping[str, str], content: bytes, url: str, attempt: int
    ) -> float | None:
        """None when the answer is a success; the seconds to wait before retrying it; or
        raises the error it is."""
        if 200 <= status < 300:
            return None
        error = error_for(status, headers, content, url)
        if status not in RETRY_STATUSES or self._spent(attempt):
            raise error
        wish = retry_after_seconds(headers.get("retry-after"))
        if wish is not None and wish > self.max_wait_seconds:
            raise error
        return self.backoff(attempt) if wish is None else wish

    def after_no_answer(self, error: Exception, url: str, attempt: int) -> float:
        if self._spent(attempt):
            raise Unavailable(f"no answer from {url}: {error!r}") from error
        return self.backoff(attempt)
