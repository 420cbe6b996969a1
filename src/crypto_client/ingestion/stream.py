"""Prices from a stream, stored like polled ones: the first observation inside each slot,
per ticker, tagged `source = 'stream'`, written in batches rather than a transaction per
message (a batch is what arrives within `COALESCE_SECONDS` of its first row: Deribit
publishes its indexes in bursts). Polling may run beside it: whichever stores a slot first
wins, the other's row for that slot is a duplicate the database refuses."""

import asyncio

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.clients.source import Observation
from crypto_client.domain import NewPrice, current_slot
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.tick import TickerOutcome, count_outcomes, place, store

log = structlog.get_logger(__name__)

COALESCE_SECONDS = 0.05
_SLOTS_REMEMBERED = 4  # slots per ticker whose first observation is known (older ones are done)


class StreamWriter:
    def __init__(
        self, engine: AsyncEngine, interval_seconds: int, max_write_delay_seconds: float, clock: SourceClock
    ) -> None:
        self._engine = engine
        self._interval = interval_seconds
        self._max_write_delay = max_write_delay_seconds
        self._clock = clock
        self._taken: dict[str, list[int]] = {}
        self._pending: list[NewPrice] = []
        self._arrived = asyncio.Event()
        self.stored = 0

    async def on_observation(self, observation: Observation) -> None:
        slot = current_slot(self._interval, observation.received_at)
        taken = self._taken.setdefault(observation.ticker, [])
        if slot in taken:
            return  # this slot already has its first observation
        row = place(observation, self._clock, slot, self._interval, log.bind(source="stream"), "stream")
        if isinstance(row, TickerOutcome):
            return  # refused (and logged) by the shared rules
        taken.append(slot)
        del taken[:-_SLOTS_REMEMBERED]
        self._pending.append(row)
        self._arrived.set()

    async def flush_forever(self) -> None:
        while True:
            await self._arrived.wait()
            await asyncio.sleep(COALESCE_SECONDS)
            self._arrived.clear()
            await self.flush()

    async def flush(self) -> None:
        rows, self._pending = self._pending, []
        if not rows:
            return
        try:
            inserted, rejected = await store(
                self._engine, rows, self._max_write_delay, log.bind(source="stream")
            )
        except Exception as exc:
            lost = [{"ticker": row.ticker, "price": str(row.price), "ts": row.ts} for row in rows]
            log.error("stream batch lost: database write failed", error=repr(exc), rows=lost)
            return
        self.stored += len(inserted)
        count_outcomes(
            "stream",
            (
                TickerOutcome(row.ticker, "failed", reason="invalid_value")
                if row.ticker in rejected
                else TickerOutcome(row.ticker, "stored" if (row.ticker, row.ts) in inserted else "duplicate")
                for row in rows
            ),
        )
        log.debug("stream batch written", rows=len(rows), stored=len(inserted), refused=len(rejected))
