"""The service's vocabulary: what a ticker is, what a stored price row is, and schedule slots.

Settings, request schemas, the table's constraints and the API's JSON all take their rules
from here, so a rule changes in one place.
"""

import re
import time
from decimal import Decimal
from typing import Literal, NamedTuple, get_args

# Deribit's index names: lower case letters, digits, `_` and `-` (as in `drbfix-btc_usdc`).
TICKER_MAX_LENGTH = 64
TICKER_PATTERN = rf"^[a-z0-9][a-z0-9_-]{{0,{TICKER_MAX_LENGTH - 1}}}$"
# What a client may type before the name is lower-cased.
TICKER_INPUT_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_-]{{0,{TICKER_MAX_LENGTH - 1}}}$"
_TICKER_RE = re.compile(TICKER_PATTERN)

# 9999-12-31T23:59:59Z: every stored or requested time lies in [0, MAX_TS], far inside BIGINT.
MAX_TS = 253_402_300_799
# Schedule intervals divide a day, so slots tile every UTC day and month (and partition).
DAY_SECONDS = 86_400

# Prices both backends store exactly (PostgreSQL NUMERIC, SQLite decimal text) and every
# client reads back unchanged: below 10^20, at most 18 decimal places (so at most 38
# significant digits). Real index prices use a handful of each.
MAX_PRICE_INTEGER_DIGITS = 20
MAX_PRICE_DECIMAL_PLACES = 18


def parse_ticker(raw: str) -> str:
    """Normalize one ticker to Deribit's form or raise `ValueError` saying why not."""
    ticker = raw.strip().lower()
    if not _TICKER_RE.fullmatch(ticker):
        raise ValueError(
            f"{raw!r} is not an index name: use lower-case letters, digits, '_' and '-' "
            f"(1 to {TICKER_MAX_LENGTH} characters, e.g. btc_usd)"
        )
    return ticker


def canonical_price(value: Decimal) -> Decimal:
    """`value` in plain form (no exponent: `1E+5` is `100000`), the same number exactly, or
    `ValueError` saying why it is not a price this service stores."""
    if not value.is_finite() or value <= 0:
        raise ValueError(f"price {value} is not a positive finite number")
    _sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    decimal_places = max(0, -exponent)
    integer_digits = max(0, len(digits) + exponent)
    if decimal_places > MAX_PRICE_DECIMAL_PLACES:
        raise ValueError(
            f"price {value} has {decimal_places} decimal places; "
            f"at most {MAX_PRICE_DECIMAL_PLACES} are stored"
        )
    if integer_digits > MAX_PRICE_INTEGER_DIGITS:
        raise ValueError(f"price {value} is not below 10^{MAX_PRICE_INTEGER_DIGITS}")
    return Decimal(plain_decimal(value))


def plain_decimal(value: Decimal) -> str:
    """The number's text without an exponent, keeping its decimal places (`2291.40`)."""
    return format(value, "f")


# Where a stored price came from: a poll of get_index_price, Deribit's own history
# (get_index_chart_data, back-filled later), the WebSocket stream, or the `index_price` of
# the first trade in the slot (back-filled from the trade history).
Source = Literal["poll", "backfill", "stream", "trade"]
SOURCES: tuple[Source, ...] = get_args(Source)

# Why a slot of a tracked ticker has no row. All but `no_tick_ran` are recorded in the ledger
# when they happen; `no_tick_ran` is what a missing slot without a record means (nothing ran
# that could have recorded it, e.g. every worker was down).
GapReason = Literal[
    "deribit_failed",  # the source gave no price (after retries)
    "late",  # the price was observed after its slot had ended
    "clock_skew",  # observed before its slot began: the scheduler's clock is ahead
    "invalid_value",  # a price this service cannot store exactly (or the database refused it)
    "database_unavailable",  # the database stayed out of reach past the write bound
    # Deribit's history cannot reach the slot: it is older than the history keeps, or the
    # history covers it only with points farther apart than the slot (they only coarsen).
    "not_repairable",
    # The back-fill got no usable history around the slot yet (an empty answer, one that
    # does not reach the slot, a hole in it): the automatic repair tries again, backing off.
    "history_unavailable",
    # The trade back-fill looked: Deribit has no trade of the index in the slot.
    "no_trade_in_slot",
    "no_tick_ran",
]


class PriceRow(NamedTuple):
    """A stored price as the API serves it; its fields are the keys of every price object."""

    ticker: str
    price: Decimal
    ts: int
    source: Source


class NewPrice(NamedTuple):
    """A price about to be stored, with the slot that observed it (None: no schedule)."""

    ticker: str
    price: Decimal
    ts: int
    slot_ts: int | None = None
    source: Source = "poll"


class SlotFailure(NamedTuple):
    """A ledger entry: why `ticker` has no row for the slot starting at `slot_ts`."""

    ticker: str
    slot_ts: int
    reason: GapReason
    detail: str


def current_slot(interval_seconds: int, now: float | None = None) -> int:
    """The start (UNIX seconds) of the schedule slot that `now` falls in."""
    moment = time.time() if now is None else now
    return int(moment // interval_seconds) * interval_seconds
