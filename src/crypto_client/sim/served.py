"""The simulator's own record of every value it served: the ground truth a checker compares
the service's rows with, without trusting anything the service says about itself."""

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import orjson

ServedKind = Literal["index_price", "chart", "trade", "ws"]
HistoryKind = Literal["chart", "trade"]
# Records kept; beyond this the oldest go (a day of three tickers polled and streamed each
# second, with their chart points, fits).
MAX_RECORDS = 2_000_000


def price_text(price: Decimal | orjson.Fragment) -> str:
    """The price exactly as it went out in JSON."""
    if isinstance(price, orjson.Fragment):
        return orjson.dumps(price).decode()
    return format(price, "f")


@dataclass
class ServedLog:
    """Append-only, numbered from 0: a reader asks for the records after the last it has."""

    records: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0  # records forgotten from the front
    _history_points: set[tuple[str, str, int, str]] = field(default_factory=set)

    def add(self, kind: ServedKind, index: str, price: Decimal | orjson.Fragment, **times: Any) -> None:
        self.records.append(
            {
                "kind": kind,
                "index": index,
                "price": price_text(price),
                "served_ms": time.time_ns() // 1_000_000,
            }
            | times
        )
        if len(self.records) > MAX_RECORDS:
            excess = len(self.records) - MAX_RECORDS
            del self.records[:excess]
            self.dropped += excess

    def add_history(self, kind: HistoryKind, index: str, points: list[tuple[int, Any]]) -> None:
        """A chart answer's points or a trade answer's index prices, each recorded once
        however often it is served again."""
        for ts_ms, price in points:
            key = (kind, index, ts_ms, price_text(price))
            if key not in self._history_points:
                self._history_points.add(key)
                self.add(kind, index, price, ts_ms=ts_ms)

    def after(self, position: int, limit: int) -> dict[str, Any]:
        start = max(position, self.dropped) - self.dropped
        chunk = self.records[start : start + limit]
        return {
            "from": start + self.dropped,
            "next": start + self.dropped + len(chunk),
            "total": self.dropped + len(self.records),
            "served": chunk,
        }
