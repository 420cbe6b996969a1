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
from crypto_client.ingestion.outcomes import TickerOutcome, count_outcomes
from crypto_client.ingestion.placement import place
from crypto_client.ingestion.storage import WriteResult, log_lost, store

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
        self.received = 0
        self.stored = 0

    async def on_observation(self, observation: Observation) -> None:
        self.received += 1
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
        bound = log.bind(source="stream")
        written = await store(self._engine, rows, self._max_write_delay, bound)
        log_lost(bound, rows, written)
        self.stored += len(written.committed)
        count_outcomes("stream", (_outcome(row, written) for row in rows))
        log.debug(
            "stream batch written",
            rows=len(rows),
            stored=len(written.committed),
            refused=len(written.rejected),
            lost=written.error is not None,
        )


def _outcome(row: NewPrice, written: WriteResult) -> TickerOutcome:
    status = written.status_of(row)
    if status != "failed":
        return TickerOutcome(row.ticker, status)
    refused = row.ticker in written.rejected
    return TickerOutcome(row.ticker, status, reason="invalid_value" if refused else "database_unavailable")
