"""The tables the queries use, by readable names (`models` defines them)."""

from sqlalchemy import Table

from crypto_client.db.models import DataOriginRecord, HourCandle, PriceTick, SlotFailureRecord, TrackedTicker
from crypto_client.domain import PriceRow

price_ticks: Table = PriceTick.__table__  # type: ignore[assignment]
tracked_tickers: Table = TrackedTicker.__table__  # type: ignore[assignment]
slot_failures: Table = SlotFailureRecord.__table__  # type: ignore[assignment]
hour_candles: Table = HourCandle.__table__  # type: ignore[assignment]
data_origin: Table = DataOriginRecord.__table__  # type: ignore[assignment]

# The columns of a `PriceRow`, in its order.
PRICE_ROW_COLUMNS = [price_ticks.c[name] for name in PriceRow._fields]
