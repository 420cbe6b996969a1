"""What the trade back-fill and the settlements job need from a source of trade history,
whatever its transport (`clients/source.py` is the same for prices). Ingestion never
imports a concrete client."""

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Instrument:
    instrument_name: str
    price_index: str  # the index its trades record
    creation_timestamp: int  # milliseconds
    expiration_timestamp: int  # milliseconds


@dataclass(frozen=True, slots=True)
class Trade:
    timestamp: int  # milliseconds, the source's clock
    index_price: Decimal  # the index at that moment, exactly as the source wrote it
    instrument_name: str


@dataclass(frozen=True, slots=True)
class DeliveryPrice:
    date: date
    delivery_price: Decimal


@dataclass(frozen=True, slots=True)
class DeliveryPage:
    data: list[DeliveryPrice]  # newest first
    records_total: int


class TradeHistorySource(Protocol):
    @property
    def requests(self) -> int:
        """Requests sent so far (for reports and estimates)."""
        ...

    async def instruments_of(self, index: str) -> list[Instrument]:
        """Every instrument, live or expired, whose trades record `index`."""
        ...

    def trades(
        self,
        instrument_name: str,
        start_ms: int,
        end_ms: int,
        *,
        now_ms: int,
        next_start: Callable[[int], int],
    ) -> AsyncIterator[list[Trade]]:
        """Pages of the instrument's trades in `start_ms..end_ms`, oldest first; each page
        after the first starts at `next_start(time of the previous page's last trade)`."""
        ...

    async def delivery_prices(self, index: str, offset: int, count: int) -> DeliveryPage:
        """A page of the index's daily delivery prices, newest first."""
        ...
