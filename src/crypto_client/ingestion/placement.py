"""Where an observed price goes: its exact value, its time by the clock rule, and the slot it
belongs to (or why it belongs to none). Every source's prices go through these rules."""

import structlog

from crypto_client.clients.source import Observation
from crypto_client.domain import NewPrice, Source, canonical_price
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.outcomes import TickerOutcome


def place(
    observation: Observation,
    clock: SourceClock,
    slot_ts: int | None,
    interval_seconds: int,
    bound: structlog.stdlib.BoundLogger,
    source: Source = "poll",
) -> NewPrice | TickerOutcome:
    """The row for `observation` inside its slot, or why there is none: the rules every
    source's prices go through (exact value, the clock rule, a time inside the slot).

    Whatever an observation holds, it fails alone: an error placing it is its own ticker's
    `invalid_value`, never the whole tick's."""
    try:
        return _place(observation, clock, slot_ts, interval_seconds, bound, source)
    except Exception as exc:
        error = f"observation not usable: {exc!r}"
        bound.exception("ticker failed", ticker=observation.ticker, error=error, reason="invalid_value")
        return TickerOutcome(observation.ticker, "failed", error=error, reason="invalid_value")


def _place(
    observation: Observation,
    clock: SourceClock,
    slot_ts: int | None,
    interval_seconds: int,
    bound: structlog.stdlib.BoundLogger,
    source: Source,
) -> NewPrice | TickerOutcome:
    ticker = observation.ticker
    try:
        price = canonical_price(observation.price)
    except ValueError as exc:
        bound.error("ticker failed", ticker=ticker, error=str(exc))
        return TickerOutcome(ticker, "failed", error=str(exc), reason="invalid_value")

    timing = clock.time_of(observation)
    if timing.problem is not None:
        bound.warning(
            "source time not used, storing the local receive time",
            ticker=ticker,
            source_time_us=observation.server_time_us,
            local_time=round(observation.received_at, 6),
            problem=timing.problem,
        )
    ts = int(timing.ts)
    if slot_ts is None:
        return NewPrice(ticker, price, ts, None, source)

    slot_end = slot_ts + interval_seconds
    received = int(observation.received_at)
    if not slot_ts <= ts < slot_end and slot_ts <= received < slot_end:
        ts = received  # the source's clock puts it across a slot edge; ours says where it was seen
    if received >= slot_end:
        error = f"observed at {observation.received_at:.3f}, after its slot {slot_ts}..{slot_end} ended"
        bound.warning("ticker failed", ticker=ticker, error=error, reason="late")
        return TickerOutcome(ticker, "failed", price, None, error, "late")
    if received < slot_ts:
        error = f"observed at {observation.received_at:.3f}, before its slot {slot_ts} began"
        bound.warning("ticker failed", ticker=ticker, error=error, reason="clock_skew")
        return TickerOutcome(ticker, "failed", price, None, error, "clock_skew")
    return NewPrice(ticker, price, ts, slot_ts, source)
