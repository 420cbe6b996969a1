"""Writing placed rows: one transaction, kept in memory and retried while the database is
unavailable (the outage buffer), one row at a time when the database refuses one, and only a
committed row counted as stored."""

from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from crypto_client.db.engine import is_database_unavailable
from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice
from crypto_client.ingestion.outcomes import Status


@dataclass(slots=True)
class WriteResult:
    """What `store` knows about its rows once it returns."""

    committed: set[tuple[str, int]] = field(default_factory=set)  # `(ticker, ts)` known to be stored
    rejected: dict[str, str] = field(default_factory=dict)  # per ticker, why the database refused it
    # Rows whose COMMIT was sent but never answered: stored or not, nobody knows (yet).
    in_doubt: set[tuple[str, int]] = field(default_factory=set)
    error: Exception | None = None  # set when the write gave up: rows not committed are lost

    def status_of(self, row: NewPrice) -> Status:
        if row.ticker in self.rejected or ((row.ticker, row.ts) not in self.committed and self.error):
            return "failed"
        return "stored" if (row.ticker, row.ts) in self.committed else "duplicate"


async def store(
    engine: AsyncEngine,
    rows: list[NewPrice],
    max_write_delay_seconds: float,
    bound: structlog.stdlib.BoundLogger,
) -> WriteResult:
    """Write `rows` in one transaction, retrying while the database is unavailable for up to
    `max_write_delay_seconds`; only a committed row counts as stored.

    A refusal for a data reason (not an availability one) fails the whole transaction, so the
    rows are then written one by one: the good ones are kept and only the bad one reported.
    A COMMIT whose answer was lost may have committed: the retry finds such a row already
    there (the insert skips it), and a row identical to the one written is this write's own.
    """
    result = WriteResult()

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        bound.warning(
            "database unavailable, keeping the tick and retrying",
            attempt=state.attempt_number,
            wait_seconds=round(state.upcoming_sleep, 2),
            tickers=[row.ticker for row in rows],
            cause=repr(error),
        )

    async def write(batch: list[NewPrice]) -> None:
        new: list[tuple[str, int]] = []
        committing = False
        try:
            async with write_transaction(engine) as writer:
                new = await writer.insert_many(batch)
                doubtful = [row for row in batch if (row.ticker, row.ts) in result.in_doubt]
                new += await writer.stored_exactly(doubtful)
                committing = True
        except Exception:
            if committing:
                result.in_doubt.update(new)
            raise
        result.committed.update(new)
        result.in_doubt.difference_update((row.ticker, row.ts) for row in batch)

    async def write_all() -> None:
        pending = [
            row
            for row in rows
            if (row.ticker, row.ts) not in result.committed and row.ticker not in result.rejected
        ]
        try:
            await write(pending)
            return
        except Exception as exc:
            if is_database_unavailable(exc):
                raise
        for row in pending:
            try:
                await write([row])
            except Exception as exc:
                if is_database_unavailable(exc):
                    raise
                result.rejected[row.ticker] = repr(exc)

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_database_unavailable),
        stop=stop_after_delay(max_write_delay_seconds),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                await write_all()
    except Exception as exc:
        result.error = exc
    return result


def log_lost(
    bound: structlog.stdlib.BoundLogger, rows: Iterable[NewPrice], result: WriteResult
) -> list[NewPrice]:
    """Log the rows `result` could not store (the log line is the last place their prices
    exist) and return them; a row whose COMMIT went unanswered is marked `in_doubt`."""
    lost = [row for row in rows if result.status_of(row) == "failed" and row.ticker not in result.rejected]
    if lost:
        bound.error(
            "tick lost: database write failed",
            error=repr(result.error),
            rows=[
                {
                    "ticker": row.ticker,
                    "price": str(row.price),
                    "ts": row.ts,
                    **({"in_doubt": True} if (row.ticker, row.ts) in result.in_doubt else {}),
                }
                for row in lost
            ],
        )
    return lost
