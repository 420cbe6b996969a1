"""Deribit's JSON-RPC protocol without a transport: the envelope, exact numbers, and what
each error means for the caller. The HTTP client uses it; a WebSocket client can too."""

import json
from decimal import Decimal
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from crypto_client.clients.deribit.errors import (
    DeribitError,
    PermanentDeribitError,
    RateLimitedError,
    TransientDeribitError,
)
from crypto_client.domain import MAX_TS

# JSON-RPC error codes that Deribit documents as "wait and try again".
RETRYABLE_RPC_CODES = frozenset({10028, 10040, 10041, 11051, 13028, 13888})
TOO_MANY_REQUESTS = 10028


class RpcError(BaseModel):
    code: int
    message: str = ""
    data: Any = None


class RpcEnvelope(BaseModel):
    """Deribit's response envelope. Fields are read by name; their order varies.

    `usIn`/`usOut` are kept as sent (integers, strings, anything): see `server_time_us`.
    """

    jsonrpc: Literal["2.0"]
    id: int | str | None = None
    result: Any = None
    error: RpcError | None = None
    usIn: Any = None  # noqa: N815 - Deribit's field name
    usOut: Any = None  # noqa: N815
    testnet: bool | None = None


class IndexPriceResult(BaseModel):
    """`get_index_price`'s result. Only `index_price` is stored, so only it is checked."""

    model_config = ConfigDict(extra="ignore")

    index_price: Decimal

    @field_validator("index_price", mode="plain")
    @classmethod
    def _check_number(cls, value: object) -> Decimal:
        # Decimals come straight from the JSON text (parse_float=Decimal); strings, booleans and
        # non-finite or non-positive numbers are not prices.
        if isinstance(value, bool) or not isinstance(value, Decimal | int):
            raise ValueError("must be a JSON number")
        number = Decimal(value)
        if not number.is_finite() or number <= 0:
            raise ValueError("must be a positive finite number")
        return number


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def decode_envelope(content: bytes | str) -> RpcEnvelope | None:
    """The envelope in `content`, numbers as exact `Decimal`s; None when it is not one (not
    JSON, not JSON-RPC, or neither a `result` nor an `error`)."""
    try:
        body = json.loads(content, parse_float=Decimal, parse_constant=_reject_constant)
        envelope = RpcEnvelope.model_validate(body)
    except (ValueError, ValidationError, RecursionError):  # RecursionError: nested too deep
        return None
    if "result" not in body and envelope.error is None:
        return None
    return envelope


def error_for(
    method: str, error: RpcError, *, http_status: int | None = None, retry_after: float | None = None
) -> DeribitError:
    """What a JSON-RPC error object means: retry (later) or give up."""
    message = f"{method}: Deribit error {error.code} {error.message}"
    if error.data is not None:
        message += f" ({error.data})"
    if error.code == TOO_MANY_REQUESTS:
        return RateLimitedError(message, retry_after=retry_after)
    if error.code in RETRYABLE_RPC_CODES or (http_status is not None and http_status >= 500):
        return TransientDeribitError(message, retry_after=retry_after)
    return PermanentDeribitError(message, code=error.code, http_status=http_status)


def parse_index_price(result: object) -> Decimal:
    """The exact index price in a `get_index_price` result, or a transient error."""
    try:
        return IndexPriceResult.model_validate(result).index_price
    except ValidationError as exc:
        raise TransientDeribitError(f"malformed get_index_price result: {first_problem(exc)}") from None


# get_index_chart_data's ranges, finest first, with how far back each reaches (seconds).
CHART_RANGES: dict[str, int | None] = {
    "1h": 3_600,
    "1d": 86_400,
    "2d": 172_800,
    "1m": 30 * 86_400,
    "1y": 365 * 86_400,
    "all": None,
}


class ChartData(NamedTuple):
    points: list[tuple[int, Decimal]]
    # The points left out, each as `point: what is wrong with it` (the text shortened).
    skipped: list[str]


def parse_chart_data(result: object) -> ChartData:
    """`get_index_chart_data`'s `[[timestamp_ms, price], ...]`, checked point by point: a bad
    point (not a pair, a time that is not a whole number of milliseconds within `MAX_TS`, a
    price that is null, zero, negative or a string) is left out, so one does not cost the rest."""
    if not isinstance(result, list):
        raise TransientDeribitError("malformed get_index_chart_data result: expected a list of points")
    data = ChartData([], [])
    for point in result:
        problem = _chart_point_problem(point)
        if problem is None:
            price = IndexPriceResult.model_validate({"index_price": point[1]}).index_price
            data.points.append((point[0], price))
        else:
            data.skipped.append(f"{repr(point)[:_SHOWN_POINT_CHARS]}: {problem}")
    return data


_SHOWN_POINT_CHARS = 120


def _chart_point_problem(point: object) -> str | None:
    if not isinstance(point, list) or len(point) != 2:
        return "not a [timestamp_ms, price] pair"
    ts_ms, price = point
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int) or not 0 <= ts_ms <= MAX_TS * 1000:
        return "the timestamp is not a time in milliseconds"
    try:
        IndexPriceResult.model_validate({"index_price": price})
    except ValidationError:
        return "the price is not a positive finite JSON number"
    return None


PRICE_INDEX_CHANNEL = "deribit_price_index."
# The newest millisecond a notification's timestamp may carry (the last second of year 9999).
_MAX_TIMESTAMP_MS = MAX_TS * 1000 + 999


class IndexNotification(BaseModel):
    """The `data` of a `deribit_price_index.{index_name}` notification."""

    model_config = ConfigDict(extra="ignore")

    index_name: str
    price: Decimal
    timestamp: int  # milliseconds, Deribit's clock

    @field_validator("price", mode="plain")
    @classmethod
    def _check_price(cls, value: object) -> Decimal:
        return IndexPriceResult.model_validate({"index_price": value}).index_price

    @field_validator("timestamp", mode="plain")
    @classmethod
    def _check_timestamp(cls, value: object) -> int:
        # Deribit sends an integer; 1e400 or 1.5 is no time, and a huge one no time at all.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a JSON integer (milliseconds)")
        if not 0 <= value <= _MAX_TIMESTAMP_MS:
            raise ValueError("must be a time in milliseconds between 1970 and 9999")
        return value


def decode_message(content: str | bytes) -> dict[str, Any] | None:
    """A WebSocket frame as a JSON object, numbers exact; None when it is not one (including
    JSON nested too deep to parse)."""
    try:
        message = json.loads(content, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None


def parse_subscription(message: dict[str, Any]) -> tuple[str, object] | None:
    """The channel and data of a `subscription` notification; None for any other message. One
    without a `params` object naming its channel raises `ValueError`."""
    if message.get("method") != "subscription":
        return None
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("channel"), str):
        raise ValueError("subscription notification without a params object naming its channel")
    return params["channel"], params.get("data")


def parse_index_notification(channel: str, data: object) -> IndexNotification:
    """The price in the `data` of a price-index `channel`; a malformed one (or one whose
    `index_name` is not the channel's) raises `ValueError`."""
    try:
        notification = IndexNotification.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"malformed price notification: {first_problem(exc)}") from None
    if PRICE_INDEX_CHANNEL + notification.index_name != channel:
        raise ValueError(f"price notification of {channel} names another index")
    return notification


def server_time_us(value: object) -> int | None:
    """`usOut` as an integer when it is one (Deribit sends it as a number or a digit string);
    None for anything else. Whether the time is plausible is for ingestion to judge."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        try:
            return int(value)
        except ValueError:  # beyond Python's limit on digits converted: no time either
            return None
    return None


def first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "result"
    return f"{where}: {error['msg']}"
