"""The service's vocabulary: what a ticker is, what a stored price row is, and schedule slots.

Settings, request schemas, the table's constraints and the API's JSON all take their rules
from here, so a rule changes in one place.
"""

import re
import time
from decimal import Decimal
from typing import NamedTuple

# Deribit's index names: lower case letters, digits, `_` and `-` (as in `drbfix-btc_usdc`).
TICKER_MAX_LENGTH = 64
TICKER_PATTERN = rf"^[a-z0-9][a-z0-9_-]{{0,{TICKER_MAX_LENGTH - 1}}}$"
# What a client may type before the name is lower-cased.
TICKER_INPUT_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_-]{{0,{TICKER_MAX_LENGTH - 1}}}$"
_TICKER_RE = re.compile(TICKER_PATTERN)

# 9999-12-31T23:59:59Z: every stored or requested time lies in [0, MAX_TS], far inside BIGINT.
MAX_TS = 253_402_300_799


def parse_ticker(raw: str) -> str:
    """Normalize one ticker to Deribit's form or raise `ValueError` saying why not."""
    ticker = raw.strip().lower()
    if not _TICKER_RE.fullmatch(ticker):
        raise ValueError(
            f"{raw!r} is not an index name: use lower-case letters, digits, '_' and '-' "
            f"(1 to {TICKER_MAX_LENGTH} characters, e.g. btc_usd)"
        )
    return ticker


class PriceRow(NamedTuple):
    """A stored price as the API serves it; its fields are the keys of every price object."""

    ticker: str
    price: Decimal
    ts: int


class NewPrice(NamedTuple):
    """A price about to be stored, with the slot that observed it (None: no schedule)."""

    ticker: str
    price: Decimal
    ts: int
    slot_ts: int | None = None


def current_slot(interval_seconds: int, now: float | None = None) -> int:
    """The start (UNIX seconds) of the schedule slot that `now` falls in."""
    moment = time.time() if now is None else now
    return int(moment // interval_seconds) * interval_seconds
