"""Deribit's past: instruments, trades (each with the index price at its moment) and daily
delivery prices. Trades older than a day live only on the history host
(`DERIBIT_HISTORY_URL`); the main host answers them with an empty page, not an error.

Results are checked here, numbers exact, with the HTTP client as transport.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator

from crypto_client.clients.deribit.errors import PermanentDeribitError, TransientDeribitError
from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.clients.deribit.rpc import IndexPriceResult, RpcEnvelope, first_problem
from crypto_client.clients.trade_source import DeliveryPage, DeliveryPrice, Instrument, Trade

TRADES_METHOD = "public/get_last_trades_by_instrument_and_time"
TRADES_PER_PAGE = 1_000
INVALID_PARAMS = -32602  # Deribit's documented maximum `count`
MAIN_HOST_REACH_MS = 86_400_000  # the main host serves the last 24 hours of trades
# Currencies whose instruments are listed apart (Deribit's get_instruments `currency`).
CURRENCIES_OF_QUOTE = {"usdc": "USDC", "usdt": "USDT", "eurr": "EURR"}


T = TypeVar("T")


def _exact(value: object) -> Decimal:
    return IndexPriceResult.model_validate({"index_price": value}).index_price


class _Instrument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instrument_name: str
    price_index: str
    kind: str = ""
    creation_timestamp: int
    expiration_timestamp: int


class _Trade(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timestamp: int  # milliseconds
    index_price: Decimal
    instrument_name: str

    @field_validator("index_price", mode="plain")
    @classmethod
    def _check_price(cls, value: object) -> Decimal:
        return _exact(value)


class _TradePage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    trades: list[_Trade]
    has_more: bool


class _DeliveryPrice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    date: date
    delivery_price: Decimal

    @field_validator("delivery_price", mode="plain")
    @classmethod
    def _check_price(cls, value: object) -> Decimal:
        return _exact(value)


class _DeliveryPage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    data: list[_DeliveryPrice]
    records_total: int


def _parse(model: TypeAdapter[T], method: str, result: object) -> T:
    try:
        return model.validate_python(result)
    except ValidationError as exc:
        raise TransientDeribitError(f"malformed {method} result: {first_problem(exc)}") from None


_INSTRUMENTS = TypeAdapter(list[_Instrument])
_TRADE_PAGE = TypeAdapter(_TradePage)
_DELIVERY_PAGE = TypeAdapter(_DeliveryPage)


def currencies_of(index: str) -> list[str]:
    """The `get_instruments` currencies whose instruments may track `index`: its base
    currency (inverse instruments) and its quote's (linear ones)."""
    base, _, quote = index.partition("_")
    return sorted({base.upper(), CURRENCIES_OF_QUOTE.get(quote, base.upper())})


class RequestPacer:
    """Starts at most `per_second` requests a second across its users: Deribit's public
    limit is per IP, so a long back-fill keeps well inside it instead of hitting 10028."""

    def __init__(self, per_second: float) -> None:
        self._gap = 1.0 / per_second
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._next > now:
                await asyncio.sleep(self._next - now)
            self._next = max(now, self._next) + self._gap


@dataclass
class HistoryClient:
    """Trades from the main host while they are recent (one day), from the history host
    before; instruments and delivery prices from the main host."""

    main: DeribitHttpClient
    history: DeribitHttpClient
    pacer: RequestPacer
    requests: int = 0

    async def _call(
        self, client: DeribitHttpClient, method: str, params: dict[str, str], model: TypeAdapter[T]
    ) -> T:
        await self.pacer.wait()
        self.requests += 1

        def parse(envelope: RpcEnvelope) -> T:
            return _parse(model, method, envelope.result)

        return await client.call(method, params, parse)

    async def instruments_of(self, index: str) -> list[Instrument]:
        found: dict[str, Instrument] = {}
        for currency in currencies_of(index):
            for expired in ("false", "true"):
                params = {"currency": currency, "kind": "any", "expired": expired}
                try:
                    listed = await self._call(self.main, "public/get_instruments", params, _INSTRUMENTS)
                except PermanentDeribitError as exc:
                    if exc.code == INVALID_PARAMS:
                        continue  # a currency Deribit does not know lists nothing
                    raise
                found.update(
                    (
                        i.instrument_name,
                        Instrument(
                            i.instrument_name, i.price_index, i.creation_timestamp, i.expiration_timestamp
                        ),
                    )
                    for i in listed
                    if i.price_index == index
                )
        return sorted(found.values(), key=lambda i: (i.creation_timestamp, i.instrument_name))

    async def trades(
        self,
        instrument_name: str,
        start_ms: int,
        end_ms: int,
        *,
        now_ms: int,
        next_start: Callable[[int], int] = lambda last_ms: last_ms + 1,
    ) -> AsyncIterator[list[Trade]]:
        """Pages of the instrument's trades in `start_ms..end_ms`, oldest first. Each page
        after the first starts at `next_start(time of the last trade)`: a caller that needs
        only the first trade of a slot skips the rest of it."""
        client = self.main if start_ms >= now_ms - MAIN_HOST_REACH_MS else self.history
        cursor = start_ms
        while cursor <= end_ms:
            params = {
                "instrument_name": instrument_name,
                "start_timestamp": str(cursor),
                "end_timestamp": str(end_ms),
                "count": str(TRADES_PER_PAGE),
                "sorting": "asc",
            }
            page = await self._call(
                client, "public/get_last_trades_by_instrument_and_time", params, _TRADE_PAGE
            )
            if page.trades:
                yield [Trade(t.timestamp, t.index_price, t.instrument_name) for t in page.trades]
            if not page.has_more or not page.trades:
                return
            cursor = max(next_start(page.trades[-1].timestamp), page.trades[-1].timestamp + 1)

    async def delivery_prices(self, index: str, offset: int, count: int) -> DeliveryPage:
        params = {"index_name": index, "offset": str(offset), "count": str(count)}
        page = await self._call(self.main, "public/get_delivery_prices", params, _DELIVERY_PAGE)
        return DeliveryPage([DeliveryPrice(p.date, p.delivery_price) for p in page.data], page.records_total)
