"""What the API accepts and answers, as the OpenAPI document describes it."""

from datetime import date
from decimal import Decimal
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from crypto_client.domain import (
    MAX_TS,
    TICKER_INPUT_PATTERN,
    TICKER_MAX_LENGTH,
    TICKER_PATTERN,
    GapReason,
    Source,
    parse_ticker,
)

MAX_LIMIT = 10_000
MAX_OFFSET = 100_000_000

ExactPrice = Annotated[
    Decimal,
    WithJsonSchema({"type": "number", "description": "The index price exactly as Deribit sent it."}),
]
Ticker = Annotated[
    str,
    Field(
        min_length=1,
        max_length=TICKER_MAX_LENGTH,
        pattern=TICKER_INPUT_PATTERN,
        description="A Deribit index name such as btc_usd (case-insensitive).",
        examples=["btc_usd"],
    ),
]
Timestamp = Annotated[int, Field(ge=0, le=MAX_TS, description="UNIX seconds.")]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description="Rows per page, at most 10000.")]
Cursor = Annotated[
    str | None,
    Field(
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Where the next page starts: copy it from the Link header.",
    ),
]


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TickerQuery(_Query):
    ticker: Ticker

    @field_validator("ticker")
    @classmethod
    def _normalize_ticker(cls, value: str) -> str:
        return parse_ticker(value)


class PageQuery(TickerQuery):
    limit: Limit = 1000
    offset: Annotated[int, Field(ge=0, le=MAX_OFFSET, description="Rows to skip (prefer cursor).")] = 0
    cursor: Cursor = None


class SettlementQuery(TickerQuery):
    from_: date | None = Field(default=None, alias="from", description="First day, YYYY-MM-DD (UTC).")
    to: date | None = Field(default=None, description="Last day, YYYY-MM-DD (UTC), inclusive.")
    limit: Limit = 1000
    cursor: Cursor = None

    @model_validator(mode="after")
    def _check_days(self) -> Self:
        if self.from_ is not None and self.to is not None and self.from_ > self.to:
            raise ValueError(f"from ({self.from_}) must not be after to ({self.to})")
        return self


class SettlementOut(BaseModel):
    """A daily settlement (delivery) price as Deribit publishes it: not an index observation."""

    date: date
    delivery_price: ExactPrice


class TimeBoundsQuery(TickerQuery):
    from_ts: Timestamp | None = Field(default=None, description="Inclusive lower bound, UNIX seconds.")
    to_ts: Timestamp | None = Field(default=None, description="Inclusive upper bound, UNIX seconds.")

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        if self.from_ts is not None and self.to_ts is not None and self.from_ts > self.to_ts:
            raise ValueError(f"from_ts ({self.from_ts}) must not be after to_ts ({self.to_ts})")
        return self


class RangeQuery(TimeBoundsQuery):
    limit: Limit = 1000
    cursor: Cursor = None


class CoverageQuery(TimeBoundsQuery):
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description="Runs of missing slots per page.")] = 1000
    cursor: Cursor = None


# Candle buckets in seconds, aligned to the UNIX epoch (UTC), except weeks: they start on
# Monday 00:00 UTC (ISO weeks), 4 days after the epoch's Thursday.
CANDLE_SECONDS = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14_400, "1d": 86_400, "1w": 604_800}
WEEK_ORIGIN = 4 * 86_400
CandleInterval = Literal["1m", "5m", "15m", "1h", "4h", "1d", "1w"]


class CandleQuery(TimeBoundsQuery):
    interval: CandleInterval = Field(description="Bucket size; weeks start on Monday 00:00 UTC.")
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description="Candles per page.")] = 1000
    cursor: Cursor = None


class AtQuery(TickerQuery):
    ts: Timestamp = Field(description="The moment to look up, UNIX seconds.")
    max_age_seconds: Annotated[int, Field(ge=0, le=MAX_TS)] | None = Field(
        default=None, description="Refuse (404) a row older than this, relative to ts."
    )


class SnapshotQuery(_Query):
    ticker: list[Ticker] = Field(
        default_factory=list, max_length=100, description="Repeatable; default: every configured ticker."
    )

    @field_validator("ticker")
    @classmethod
    def _normalize_tickers(cls, values: list[str]) -> list[str]:
        return list(dict.fromkeys(parse_ticker(value) for value in values))


class ExportQuery(TimeBoundsQuery):
    format: Literal["csv", "ndjson", "parquet"] = Field(
        default="csv", description="csv (with a header line), ndjson, or parquet (row groups)."
    )


FillPolicy = Literal["none", "null", "prev"]


class ResampleQuery(TimeBoundsQuery):
    interval: CandleInterval = Field(description="Bucket size; weeks start on Monday 00:00 UTC.")
    fill: FillPolicy = Field(
        default="none",
        description="Empty buckets: none omits them, null gives them a null price, prev carries "
        "the last earlier price forward (as of the bucket's start).",
    )
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description="Buckets per page.")] = 1000
    cursor: Cursor = None


class QualityQuery(TimeBoundsQuery):
    limit: Annotated[int, Field(ge=1, le=1000, description="UTC days per page.")] = 100
    cursor: Cursor = None


class CandleOut(BaseModel):
    ts: int = Field(description="The bucket's start, UNIX seconds.")
    open: ExactPrice = Field(description="The price of the bucket's first row by ts.")
    high: ExactPrice
    low: ExactPrice
    close: ExactPrice = Field(description="The price of the bucket's last row by ts.")
    count: int = Field(description="Rows in the bucket.")
    backfilled: int = Field(description="How many of them were back-filled.")


class ResampleOut(BaseModel):
    ts: int = Field(description="The bucket's start, UNIX seconds.")
    price: ExactPrice | None = Field(
        description="The price of the bucket's last row by ts; for a filled bucket the carried "
        "price (fill=prev) or null (fill=null, or nothing earlier to carry)."
    )
    count: int = Field(description="Rows in the bucket (0 for a filled one).")
    backfilled: int = Field(description="How many of them were back-filled from Deribit's history.")
    trade: int = Field(description="How many of them came from trades.")
    filled: bool = Field(description="The bucket had no row: its price is the fill policy's.")


class JumpOut(BaseModel):
    ts: int = Field(description="The later row's ts.")
    previous_ts: int
    previous_price: ExactPrice
    price: ExactPrice
    change: ExactPrice = Field(description="price - previous_price (may be negative).")
    relative: float = Field(description="change / previous_price.")


class GapSpanOut(BaseModel):
    from_ts: int = Field(description="Start of the first missing slot.")
    to_ts: int = Field(description="Last second of the last missing slot.")
    slots: int


class SourceDifferenceOut(BaseModel):
    minute_ts: int = Field(description="The minute's start.")
    poll: ExactPrice = Field(description="The polled price in that minute.")
    other: ExactPrice = Field(description="The chart (backfill) or trade price in that minute.")
    other_source: str
    difference: ExactPrice = Field(description="|poll - other|.")


class QualityDayOut(BaseModel):
    day: str = Field(description="The UTC day, YYYY-MM-DD.", examples=["2026-12-01"])
    from_ts: int = Field(description="The day's first second.")
    expected_slots: int
    stored_slots: dict[str, int] = Field(description="Expected slots with a row, by the row's source.")
    missing_slots: int
    completeness: float | None = Field(description="Stored over expected slots; null when none expected.")
    rows: int = Field(description="Rows in the day, expected slots or not.")
    first_ts: int | None
    last_ts: int | None
    longest_gap: GapSpanOut | None
    largest_absolute_jump: JumpOut | None
    largest_relative_jump: JumpOut | None
    largest_source_difference: SourceDifferenceOut | None


class QualityOut(BaseModel):
    ticker: str
    interval_seconds: int
    days: list[QualityDayOut]


class SnapshotOut(BaseModel):
    ticker: str
    price: ExactPrice | None
    ts: int | None
    source: Source | None
    age_seconds: int | None


class PriceOut(BaseModel):
    """A stored price (`domain.PriceRow`) as the OpenAPI document shows it."""

    ticker: str = Field(pattern=TICKER_PATTERN)
    price: ExactPrice
    ts: Timestamp
    source: Source = Field(
        description="poll: observed by get_index_price; backfill: from Deribit's history, "
        "possibly coarser; stream: from the WebSocket stream; trade: the index_price of the "
        "first trade in the slot (from Deribit's trade history)."
    )


class LatestOut(PriceOut):
    age_seconds: int = Field(description="Now minus ts, in seconds.")


class GapOut(BaseModel):
    from_ts: int = Field(description="Start of the first missing slot.")
    to_ts: int = Field(description="Last second of the last missing slot.")
    slots: int
    reason: GapReason
    detail: str


class CoverageOut(BaseModel):
    ticker: str
    interval_seconds: int
    from_ts: int | None = Field(description="Start of the first expected slot (null: none yet).")
    to_ts: int | None = Field(description="Last second of the last expected slot.")
    expected_slots: int
    stored_slots: dict[Source, int]
    missing_slots: int
    coverage: float = Field(description="Stored slots over expected slots (1.0 when none expected).")
    gaps: list[GapOut]


class ReadinessOut(BaseModel):
    status: str = Field(examples=["ok"])
    database: str = Field(examples=["ok"])
    stale: dict[str, str] = Field(description="Configured tickers without a fresh price, and why.")
    replication: str = Field(
        default="not a replica",
        examples=["not a replica", "ok: 0.4 s behind the primary"],
        description="Whether the replica the API reads (DATABASE_READ_URL) keeps up with the primary.",
    )
    stream: str | None = Field(
        None,
        examples=["connected"],
        description="The stream consumer running in this process (`serve` with STREAM_ENABLED): "
        "`connected`, `connecting`, or `not running: <why>` (then the status is 503); "
        "null when none runs here.",
    )


class TickerOut(BaseModel):
    ticker: str
    configured: bool = Field(description="Whether the service ingests this ticker now.")
    rows: int
    first_ts: int | None
    last_ts: int | None
    age_seconds: int | None = Field(description="Now minus last_ts.")
    coverage_24h: float | None = Field(description="Coverage of the last 24 hours (null: not tracked).")


class HealthOut(BaseModel):
    status: str = Field(examples=["ok"])
    database: str = Field(examples=["ok"])
    data_origin: str | None = Field(
        default=None,
        examples=["www.deribit.com"],
        description="Where the stored prices come from (a Deribit host, or `simulator`); null: none yet.",
    )
    data_origin_overrides: list[str] = Field(
        default=[], description="Other origins that wrote here under ALLOW_ORIGIN_CHANGE."
    )


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong, for a person to read.")


class ValidationProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorOut(ErrorOut):
    errors: list[ValidationProblem]
