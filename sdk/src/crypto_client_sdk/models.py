"""The typed, immutable objects the client yields. Every price is a `Decimal` read from the
JSON number's own text, never through a float."""

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple


class Price(NamedTuple):
    """A stored price. `event_id` is set on prices from `stream()` only: the server's place of
    the row in the order rows were stored, what a resume starts after. It takes no part in
    equality, so a streamed price equals the same row read from `prices()`. (A named tuple
    rather than a dataclass: a long walk builds hundreds of thousands, and it is built in C.)"""

    ticker: str
    price: Decimal
    ts: int
    source: str
    event_id: int | None = None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Price):
            return self[:4] == other[:4]
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if isinstance(other, Price):
            return self[:4] != other[:4]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self[:4])


@dataclass(frozen=True, slots=True)
class LatestPrice:
    ticker: str
    price: Decimal
    ts: int
    source: str
    age_seconds: int


@dataclass(frozen=True, slots=True)
class Candle:
    ts: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    count: int
    backfilled: int
    trade: int | None = None
    """Rows from trades in the bucket; None where the server does not report it."""


@dataclass(frozen=True, slots=True)
class Bucket:
    """One interval of `/prices/resample`: `price` is the bucket's last observation, or the
    carried one (`filled` with fill=prev), or None (`filled` with fill=null)."""

    ts: int
    price: Decimal | None
    count: int
    filled: bool
    backfilled: int
    trade: int | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    from_ts: int
    to_ts: int
    slots: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Coverage:
    """`/coverage` with the gaps of every page."""

    ticker: str
    interval_seconds: int
    from_ts: int | None
    to_ts: int | None
    expected_slots: int
    stored_slots: Mapping[str, int]
    missing_slots: int
    coverage: float
    gaps: tuple[Gap, ...]


@dataclass(frozen=True, slots=True)
class QualityDay:
    """One UTC day of `/quality`. `figures` holds the day's other measures as the server
    names them (longest gap, largest jumps, largest poll/chart difference), numbers exact."""

    date: datetime.date
    expected_slots: int
    stored_slots: Mapping[str, int]
    missing_slots: int
    completeness: Decimal | None  # None for a day with no expected slot
    figures: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Settlement:
    """A daily delivery (settlement) price: not an index observation."""

    date: datetime.date
    delivery_price: Decimal
