"""Wake-ups for live readers when rows are stored: PostgreSQL's LISTEN/NOTIFY across
processes, and a process-local announcement that also covers SQLite.

A wake-up carries nothing: readers then ask the database for the rows after the last `seq`
they saw, so a lost or repeated wake-up costs latency, never a row.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from crypto_client.db.engine import async_url

log = structlog.get_logger(__name__)

CHANNEL = "price_ticks_stored"
_RELISTEN_SECONDS = 1.0

_local_listeners: set[Callable[[], None]] = set()


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
