"""Faults the simulator can inject, globally or per index, set at start or at run time."""

import random
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any


class FaultKind(StrEnum):
    ERROR = "error"  # HTTP 503 with an HTML body, as an edge proxy sends when Deribit is down
    TIMEOUT = "timeout"  # hold the request without answering
    DROP = "drop"  # close the connection in the middle of the response
    MALFORMED = "malformed"  # HTTP 200 with a truncated JSON body
    BAD_RESULT = "bad_result"  # a well-formed envelope whose index_price is not a number
    RATE_LIMIT = "rate_limit"  # HTTP 429 with JSON-RPC error 10028 too_many_requests


class HostileFrame(StrEnum):
    """Frames a broken or hostile server can send on the WebSocket stream (`ws_hostile_next`)."""

    TRUNCATED = "truncated"  # a notification cut off mid-object
    NOT_JSON = "not_json"  # text that is no JSON at all
    NOT_AN_OBJECT = "not_an_object"  # valid JSON that is not an object (an array)
    BINARY = "binary"  # a binary frame that is not UTF-8 (Deribit sends text frames)
    DEEP_NESTING = "deep_nesting"  # a notification whose data nests 100,000 arrays deep
    HUGE = "huge"  # a 2 MiB text frame, twice the client's frame limit
    HEARTBEAT_PARAMS_NOT_OBJECT = "heartbeat_params_not_object"  # "params": ["test_request"]
    TIMESTAMP_OVERFLOW = "timestamp_overflow"  # a notification with "timestamp": 1e400
    STRING_PRICE = "string_price"  # a notification with "price": "43000.5"
    INDEX_NAME_MISMATCH = "index_name_mismatch"  # a subscribed channel carrying another index


class ChartFault(StrEnum):
    """What can be wrong with a well-formed get_index_chart_data answer."""

    EMPTY = "empty"  # no points at all
    OUT_OF_WINDOW = "out_of_window"  # the points of a window one range-reach earlier


# The bad points a chart answer can carry, in turn: a null point, and prices that are null,
# zero, negative, or a string.
BAD_CHART_POINTS = ("null_point", "null_price", "zero_price", "negative_price", "string_price")

_RATES = (
    "error_rate",
    "timeout_rate",
    "drop_rate",
    "malformed_rate",
    "rate_limit_rate",
    "chart_empty_rate",
    "chart_out_of_window_rate",
    "chart_bad_point_rate",
)


@dataclass
class Faults:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after_seconds: float | None = None  # sent as Retry-After with rate-limit answers
    outage: bool = False  # every request fails with ERROR
    fail_next: int = 0  # the next N requests fail with fail_next_kind
    fail_next_kind: FaultKind = FaultKind.ERROR
    # Deribit's clock as the envelope's usIn/usOut show it: shifted (a negative change is a
    # step back), stopped, or replaced by any JSON text (a string, -5000, 1e25, true).
    clock_offset_seconds: float = 0.0
    clock_frozen: bool = False
    us_out_literal: str | None = None
    # The WebSocket stream: its cadence, and what can go wrong with it.
    stream_interval_ms: float = 1000.0  # one notification per subscribed channel this often
    heartbeat_scale: float = 1.0  # shortens heartbeat intervals for tests (Deribit's floor is 10 s)
    ws_refuse: bool = False  # new connections are refused at the handshake
    ws_stall: bool = False  # open connections go silent without closing
    ws_disconnects: int = 0  # change it to drop every open connection
    ws_drop_channels: tuple[str, ...] = ()  # channels a subscribe answer leaves out
    ws_malformed_next: int = 0  # the next N notifications are truncated JSON
    # Sent once each, in order, before the next notifications (to the first connection that
    # pushes): see HostileFrame.
    ws_hostile_next: tuple[HostileFrame, ...] = ()
    # Every connection also gets notifications for these channels, subscribed or not.
    ws_unsubscribed_channels: tuple[str, ...] = ()
    ws_drop_after: int = 0  # each connection is closed after this many notifications (0: never)
    # get_index_chart_data: answers that are empty or lie outside the range's window, and
    # points (each drawn alone) replaced by a bad one.
    chart_empty_rate: float = 0.0
    chart_out_of_window_rate: float = 0.0
    chart_bad_point_rate: float = 0.0

    def update(self, changes: dict[str, Any]) -> "Faults":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        updated = replace(self, **changes)
        if not 0 <= updated.latency_ms <= 600_000:
            raise ValueError("latency_ms must be between 0 and 600000")
        for name in _RATES:
            if not 0.0 <= getattr(updated, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if updated.fail_next < 0:
            raise ValueError("fail_next must be >= 0")
        updated.ws_drop_channels = tuple(updated.ws_drop_channels)
        updated.ws_unsubscribed_channels = tuple(updated.ws_unsubscribed_channels)
        updated.ws_hostile_next = tuple(HostileFrame(kind) for kind in updated.ws_hostile_next)
        if updated.ws_drop_after < 0:
            raise ValueError("ws_drop_after must be >= 0")
        if not 10 <= updated.stream_interval_ms <= 600_000 or not 0 < updated.heartbeat_scale <= 1:
            raise ValueError("stream_interval_ms must be 10 to 600000, heartbeat_scale above 0 and at most 1")
        if abs(updated.clock_offset_seconds) > 10**9:
            raise ValueError("clock_offset_seconds must be within +-1e9")
        updated.fail_next_kind = FaultKind(updated.fail_next_kind)
        return updated

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FaultPlan:
    """The global faults plus overrides per index; an index's own settings win."""

    seed: int = 0
    default: Faults = field(default_factory=Faults)
    per_index: dict[str, Faults] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def set(self, index: str | None, changes: dict[str, Any]) -> None:
        if index is None:
            self.default = self.default.update(changes)
        else:
            self.per_index[index] = self.per_index.get(index, self.default).update(changes)

    def reset(self) -> None:
        self.default = Faults()
        self.per_index.clear()
        self._rng = random.Random(self.seed)

    def for_index(self, index: str | None) -> Faults:
        return self.per_index.get(index, self.default) if index is not None else self.default

    def draw(self, index: str | None) -> tuple[float, FaultKind | None]:
        """The latency and the fault (if any) for the next request to `index`."""
        faults = self.for_index(index)
        if faults.outage:
            return faults.latency_ms, FaultKind.ERROR
        if faults.fail_next > 0:
            faults.fail_next -= 1
            return faults.latency_ms, faults.fail_next_kind
        for kind, rate in (
            (FaultKind.ERROR, faults.error_rate),
            (FaultKind.TIMEOUT, faults.timeout_rate),
            (FaultKind.DROP, faults.drop_rate),
            (FaultKind.MALFORMED, faults.malformed_rate),
            (FaultKind.RATE_LIMIT, faults.rate_limit_rate),
        ):
            if rate and self._rng.random() < rate:
                return faults.latency_ms, kind
        return faults.latency_ms, None

    def draw_chart(self, index: str) -> ChartFault | None:
        """What is wrong with the next chart answer for `index`, if anything."""
        faults = self.for_index(index)
        for kind, rate in (
            (ChartFault.EMPTY, faults.chart_empty_rate),
            (ChartFault.OUT_OF_WINDOW, faults.chart_out_of_window_rate),
        ):
            if rate and self._rng.random() < rate:
                return kind
        return None

    def draw_bad_point(self, index: str) -> bool:
        rate = self.for_index(index).chart_bad_point_rate
        return bool(rate) and self._rng.random() < rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "default": self.default.as_dict(),
            "per_index": {name: faults.as_dict() for name, faults in self.per_index.items()},
        }
