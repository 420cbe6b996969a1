"""Read-only access: `PriceReader`, every query the API and coverage run, composed of one
part per table family; and `ReadDatabase`, the read-only session type that hands readers out."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from crypto_client.db.candles import CandleReads
from crypto_client.db.changes import ChangeReads
from crypto_client.db.engine import DatabaseUnavailableError, QueryTimeoutError
from crypto_client.db.ledger import LedgerReads
from crypto_client.db.pages import PageReads
from crypto_client.db.prices import PriceReads
from crypto_client.db.status import StatusReads


class PriceReader(PriceReads, PageReads, CandleReads, LedgerReads, ChangeReads, StatusReads):
    """Read-only queries on one connection."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    @property
    def connection(self) -> AsyncConnection:
        """The read connection, for readers of other tables (settlement prices)."""
        return self._connection


class ReadDatabase:
    """A read-only engine behind a first-come, first-served queue.

    Under more concurrent requests than pooled connections, SQLAlchemy's pool hands freed
    connections to whichever waiter wakes first, so a few requests can starve until the
    pool timeout; waiting on a (fair) asyncio semaphore first keeps every wait short.
    """

    def __init__(self, engine: AsyncEngine, connections: int, statement_timeout_seconds: float) -> None:
        self.engine = engine
        self._slots = asyncio.Semaphore(connections)
        # PostgreSQL ends a longer statement itself; this also bounds SQLite and the wait for
        # a connection, a little later so that PostgreSQL's own message wins there.
        self._deadline = statement_timeout_seconds + 0.5

    @asynccontextmanager
    async def reader(self, *, queued: bool = True) -> AsyncIterator[PriceReader]:
        """A reader on one pooled connection; `queued=False` skips the queue (health checks
        ask whether the database answers, not how busy the API is)."""
        deadline = asyncio.timeout(self._deadline)
        try:
            async with deadline, AsyncExitStack() as stack:
                if queued:
                    await stack.enter_async_context(self._slots)
                try:
                    connection = await stack.enter_async_context(self.engine.connect())
                except (OSError, TimeoutError) as exc:
                    # Connecting fails with the driver's raw socket errors, which SQLAlchemy
                    # does not wrap; name them here so that only these become "unavailable".
                    raise DatabaseUnavailableError(f"cannot connect: {exc!r}") from exc
                yield PriceReader(connection)
        except TimeoutError:
            if deadline.expired():
                raise QueryTimeoutError(f"no answer within {self._deadline:g} s") from None
            raise
