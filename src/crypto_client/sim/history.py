"""The simulator's past: instruments, their trades and the daily delivery prices.

Everything here is a pure function of the seed and the simulator's start, so a test can compute
what Deribit "has" and check a back-fill against it exactly. Trades are drawn per instrument per
minute from their own seeded generator: any window is produced without producing what lies
before it, so a year streams in constant memory.
"""

import random
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from crypto_client.sim.prices import PriceWalk

MINUTE_MS = 60_000
DAY_MS = 86_400_000
MAIN_HOST_REACH_MS = DAY_MS  # the main host answers trades of the last 24 hours only
MAX_TRADES_PER_PAGE = 1_000
# The perpetual trades in this share of minutes, the future in its own, independently: some
# minutes only the future traded in, some nobody did.
PERPETUAL_ACTIVE_SHARE = 0.85
FUTURE_ACTIVE_SHARE = 0.3
FUTURE_EXPIRED_DAYS_AGO = 4  # before the simulator's start day
FUTURE_LIFETIME_DAYS = 90
PERPETUAL_LISTED_DAYS = 3_000
DELIVERY_PRICES_SINCE = date(2018, 1, 1)
DELIVERY_HOUR_UTC = 8


class JsonRpcParamsError(ValueError):
    """A request parameter Deribit would refuse with -32602; `param` names it."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


def _currency_and_base(index: str) -> tuple[str, str, str] | None:
    """(currency the instruments are listed under, base, quote) of an index with instruments."""
    base, _, quote = index.partition("_")
    if not base.isalpha() or quote not in ("usd", "usdc"):
        return None
    return ("USDC" if quote == "usdc" else base.upper()), base.upper(), quote


class TradeHistory:
    def __init__(self, walk: PriceWalk, seed: int, started_ms: int) -> None:
        self.walk = walk
        self.seed = seed
        self._start_day_ms = started_ms // DAY_MS * DAY_MS
        self.instruments = self._list_instruments()
        self._by_name = {str(i["instrument_name"]): i for i in self.instruments}

    def _list_instruments(self) -> list[dict[str, Any]]:
        """A perpetual and one expired future per index that has instruments."""
        expiration = self._start_day_ms - FUTURE_EXPIRED_DAYS_AGO * DAY_MS + DELIVERY_HOUR_UTC * 3_600_000
        code = datetime.fromtimestamp(expiration / 1000, UTC).strftime("%d%b%y").upper()
        instruments = []
        for index in self.walk.names:
            listing = _currency_and_base(index)
            if listing is None:
                continue
            currency, base, quote = listing
            prefix = base if quote == "usd" else f"{base}_USDC"
            common = {
                "price_index": index,
                "kind": "future",
                "base_currency": base,
                "quote_currency": "USD" if quote == "usd" else "USDC",
                "settlement_currency": base if quote == "usd" else "USDC",
                "currency": currency,
            }
            instruments.append(
                {
                    **common,
                    "instrument_name": f"{prefix}-PERPETUAL",
                    "is_active": True,
                    "creation_timestamp": self._start_day_ms - PERPETUAL_LISTED_DAYS * DAY_MS,
                    "expiration_timestamp": 32_503_680_000_000,
                }
            )
            instruments.append(
                {
                    **common,
                    "instrument_name": f"{prefix}-{code}",
                    "is_active": False,
                    "creation_timestamp": expiration - FUTURE_LIFETIME_DAYS * DAY_MS,
                    "expiration_timestamp": expiration,
                }
            )
        return instruments

    def get_instruments(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        currency = params.get("currency")
        if not isinstance(currency, str) or not currency:
            raise JsonRpcParamsError("currency", "missing param")
        expired = str(params.get("expired", "false")).lower() == "true"
        kind = params.get("kind")
        return [
            {key: value for key, value in instrument.items() if key != "currency"}
            for instrument in self.instruments
            if instrument["currency"] == currency.upper()
            and instrument["is_active"] is not expired
            and kind in (None, "any", instrument["kind"])
        ]

    def index_of(self, instrument_name: str) -> str:
        return str(self._by_name[instrument_name]["price_index"])

    def trades(self, instrument_name: str, start_ms: int, end_ms: int) -> Iterator[dict[str, Any]]:
        """Every trade of the instrument with `start_ms <= timestamp <= end_ms`, oldest first."""
        instrument = self._by_name[instrument_name]
        first = max(start_ms, int(instrument["creation_timestamp"]))
        last = min(end_ms, int(instrument["expiration_timestamp"]))
        share = PERPETUAL_ACTIVE_SHARE if instrument["is_active"] else FUTURE_ACTIVE_SHARE
        index = str(instrument["price_index"])
        for minute in range(first // MINUTE_MS * MINUTE_MS, last + 1, MINUTE_MS):
            rng = random.Random(f"{self.seed}:{instrument_name}:{minute}")
            if rng.random() >= share:
                continue
            offsets = sorted(rng.randrange(MINUTE_MS) for _ in range(rng.randint(1, 3)))
            for n, offset in enumerate(offsets):
                ts = minute + offset
                if first <= ts <= last:
                    yield {
                        "trade_seq": minute // MINUTE_MS * 4 + n,
                        "trade_id": f"{minute // MINUTE_MS}-{n}",
                        "timestamp": ts,
                        "tick_direction": n % 4,
                        "price": self.walk.price_at(index, ts),
                        "mark_price": self.walk.price_at(index, ts),
                        "instrument_name": instrument_name,
                        "index_price": self.walk.price_at(index, ts),
                        "direction": "buy" if n % 2 else "sell",
                        "amount": 10,
                    }

    def get_trades(self, params: Mapping[str, Any], *, now_ms: int, history_host: bool) -> dict[str, Any]:
        name = params.get("instrument_name")
        if not isinstance(name, str) or name not in self._by_name:
            raise JsonRpcParamsError("instrument_name", "wrong format")
        start, end = _int_param(params, "start_timestamp"), _int_param(params, "end_timestamp")
        count = _int_param(params, "count", MAX_TRADES_PER_PAGE)
        if not 1 <= count <= MAX_TRADES_PER_PAGE:
            raise JsonRpcParamsError("count", f"must be between 1 and {MAX_TRADES_PER_PAGE}")
        if str(params.get("sorting", "asc")) not in ("asc", "default"):
            raise JsonRpcParamsError("sorting", "this simulator serves sorting=asc only")
        end = min(end, now_ms)
        if not history_host and start < now_ms - MAIN_HOST_REACH_MS:
            # Deribit's main host: nothing older than 24 hours, and no error saying so.
            return {"trades": [], "has_more": False}
        page: list[dict[str, Any]] = []
        for trade in self.trades(name, start, end):
            if len(page) == count:
                return {"trades": page, "has_more": True}
            page.append(trade)
        return {"trades": page, "has_more": False}

    def get_delivery_prices(self, params: Mapping[str, Any], *, now_ms: int) -> dict[str, Any]:
        """Daily settlement prices, newest first: the index at 08:00 UTC of each day so far."""
        name = params.get("index_name")
        if not isinstance(name, str) or name not in self.walk:
            raise JsonRpcParamsError("index_name", "wrong format")
        offset = _int_param(params, "offset", 0)
        count = _int_param(params, "count", 10)
        if offset < 0 or not 1 <= count <= 1_000:
            raise JsonRpcParamsError("count", "offset must be >= 0 and count between 1 and 1000")
        newest = self.delivery_dates(now_ms)
        total = (newest - DELIVERY_PRICES_SINCE).days + 1
        data = []
        for n in range(offset, min(total, offset + count)):
            day = newest - timedelta(days=n)
            data.append({"date": day.isoformat(), "delivery_price": self.delivery_price(name, day)})
        return {"data": data, "records_total": total}

    def delivery_dates(self, now_ms: int) -> date:
        """The newest day with a delivery price: today once 08:00 UTC has passed."""
        moment = datetime.fromtimestamp(now_ms / 1000, UTC)
        return moment.date() if moment.hour >= DELIVERY_HOUR_UTC else moment.date() - timedelta(days=1)

    def delivery_price(self, index: str, day: date) -> Decimal:
        at = datetime(day.year, day.month, day.day, DELIVERY_HOUR_UTC, tzinfo=UTC)
        return self.walk.price_at(index, int(at.timestamp() * 1000))


def _int_param(params: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = params.get(name, default)
    try:
        return int(str(value)) if value is not None else _missing(name)
    except ValueError:
        raise JsonRpcParamsError(name, "must be an integer") from None


def _missing(name: str) -> int:
    raise JsonRpcParamsError(name, "missing param")
