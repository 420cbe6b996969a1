"""Live readers: the rows stored after a `seq`, and the wake-ups when rows are stored
(PostgreSQL's LISTEN/NOTIFY across processes, and a process-local announcement that also
covers SQLite).

A wake-up carries nothing: readers then ask the database for the rows after the last `seq`
they saw, so a lost or repeated wake-up costs latency, never a row.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NamedTuple

import structlog
from sqlalchemy import BigInteger, Integer, bindparam, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from crypto_client.db.tables import PRICE_ROW_COLUMNS, price_ticks
from crypto_client.domain import PriceRow
from crypto_client.setting_values import async_url

log = structlog.get_logger(__name__)

CHANNEL = "price_ticks_stored"
_RELISTEN_SECONDS = 1.0

_local_listeners: set[Callable[[], None]] = set()


class StoredRow(NamedTuple):
    """A row with its place in the order rows were stored (`seq`)."""

    seq: int
    row: PriceRow


class ChangeReads:
    """Part of `PriceReader`."""

    _connection: AsyncConnection

    _NEWEST_SEQ = select(func.coalesce(func.max(price_ticks.c.seq), 0))

    async def newest_seq(self) -> int:
        """The `seq` of the row stored last (0 when none has one)."""
        return int((await self._connection.execute(self._NEWEST_SEQ)).scalar_one())

    _STORED_AFTER = (
        select(price_ticks.c.seq, *PRICE_ROW_COLUMNS)
        .where(price_ticks.c.seq > bindparam("seq", type_=BigInteger))
        .order_by(price_ticks.c.seq)
        .limit(bindparam("limit", type_=Integer))
    )

    async def stored_after(self, seq: int, tickers: Sequence[str] | None, *, limit: int) -> list[StoredRow]:
        """Up to `limit` rows stored after `seq`, of `tickers` (every ticker when None), in
        the order they were stored."""
        query = (
            self._STORED_AFTER
            if tickers is None
            else self._STORED_AFTER.where(price_ticks.c.ticker.in_(tickers))
        )
        result = await self._connection.execute(query, {"seq": seq, "limit": limit})
        return [
            StoredRow(seq, PriceRow(ticker, price, ts, source)) for seq, ticker, price, ts, source in result
        ]


def announce_stored() -> None:
    """Tell this process's live readers that a write transaction stored rows."""
    for listener in list(_local_listeners):
        listener()


@contextlib.asynccontextmanager
async def stored_signal(listen_url: str | None) -> AsyncIterator[asyncio.Event]:
    """An event set whenever rows may have been stored: by this process, or (when
    `listen_url` is a PostgreSQL database) by any process writing to it."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()

    def wake() -> None:
        # Writers may run on another thread's loop (the embedded simulator's, say).
        loop.call_soon_threadsafe(event.set)

    _local_listeners.add(wake)
    listener: asyncio.Task[None] | None = None
    if listen_url is not None and make_url(listen_url).get_backend_name() == "postgresql":
        listener = asyncio.create_task(_listen(listen_url, event.set), name="price-ticks-listen")
    try:
        yield event
    finally:
        _local_listeners.discard(wake)
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


async def _listen(url: str, wake: Callable[[], None]) -> None:
    """LISTEN on a connection of its own (not the request pool's), again after every loss."""
    listen_engine = create_async_engine(async_url(url), poolclass=NullPool)
    try:
        while True:
            try:
                await _listen_once(listen_engine, wake)
            except Exception as exc:
                log.warning("listening for stored rows failed, retrying", error=repr(exc))
            wake()  # rows may have been stored while nobody listened
            await asyncio.sleep(_RELISTEN_SECONDS)
    finally:
        await listen_engine.dispose()


async def _listen_once(engine: AsyncEngine, wake: Callable[[], None]) -> None:
    lost = asyncio.Event()
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        await driver.add_listener(CHANNEL, lambda *_: wake())
        driver.add_termination_listener(lambda *_: lost.set())
        log.info("listening for stored rows", channel=CHANNEL)
        await lost.wait()
