"""Live prices for `/prices/stream`: one reader per API process follows the rows stored in
`seq` order and hands each to the clients that asked for its ticker.

Each client has a bounded queue; one that falls `CLIENT_QUEUE_ROWS` behind is dropped (it
reconnects with `Last-Event-ID` and loses nothing), so a client that never reads cannot grow
the server's memory.

A resume point beyond the newest stored row (the database was restored or swapped since the
client's last event) restarts the client at the newest row, and the client is told so by a
`ResumeReset` before anything else: it is never left waiting for ids that may never come.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, NamedTuple

import structlog
from fastapi import Depends, Request

from crypto_client.db.changes import StoredRow, stored_signal
from crypto_client.db.engine import is_database_unavailable, is_query_timeout
from crypto_client.db.reader import ReadDatabase

log = structlog.get_logger(__name__)

CLIENT_QUEUE_ROWS = 1000
# Rows read per query, by the feed and by a resuming client.
READ_BATCH_ROWS = 1000
# Wake-ups come from LISTEN/NOTIFY or this process's writers; this also finds rows written
# by a process that could not wake us (another process on SQLite, or a lost LISTEN).
POLL_SECONDS = 1.0


class Subscription:
    def __init__(self, tickers: frozenset[str]) -> None:
        self.tickers = tickers
        # None marks the end: the client was dropped or the server is stopping.
        self.queue: asyncio.Queue[StoredRow | None] = asyncio.Queue(CLIENT_QUEUE_ROWS)

    def offer(self, stored: StoredRow) -> bool:
        """Queue `stored`; False when the client has fallen too far behind."""
        try:
            self.queue.put_nowait(stored)
        except asyncio.QueueFull:
            return False
        return True

    def end(self) -> None:
        # Empty the queue first: a full queue would refuse the end mark, and the rows it
        # holds are the memory a dropped client must give back.
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class PriceFeed:
    def __init__(self, database: ReadDatabase, listen_url: str | None) -> None:
        self._database = database
        self._listen_url = listen_url
        self._subscriptions: set[Subscription] = set()
        # Where the rows handed out end; None while nobody listens.
        self._last_seq: int | None = None
        self._closed = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["PriceFeed"]:
        async with stored_signal(self._listen_url) as stored:
            task = asyncio.create_task(self._follow(stored), name="price-feed")
            try:
                yield self
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self.close()

    def close(self) -> None:
        """End every stream: the server is stopping, and it waits for open responses."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription.end()
        self._subscriptions.clear()

    async def wait_ready(self) -> None:
        """Know where the stored rows end (a database error here is the request's: a 503);
        a client's live rows are the ones after it."""
        if self._last_seq is None:
            async with self._database.reader() as reader:
                newest = await reader.newest_seq()
            if self._last_seq is None:
                self._last_seq = newest

    @contextlib.asynccontextmanager
    async def subscribe(self, tickers: Sequence[str]) -> AsyncIterator[Subscription]:
        """Rows stored from now on, for `tickers`. Every row with a `seq` above the feed's
        position at subscription time will be queued (or the client dropped)."""
        subscription = Subscription(frozenset(tickers))
        if self._closed:
            subscription.end()
        else:
            # Listed first: the feed keeps its position while anyone is listed.
            self._subscriptions.add(subscription)
        try:
            await self.wait_ready()
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    async def _follow(self, stored: asyncio.Event) -> None:
        while True:
            try:
                await self._catch_up()
            except Exception as exc:
                if is_database_unavailable(exc) or is_query_timeout(exc):
                    log.warning("live feed cannot read new rows, retrying", error=str(exc).splitlines()[0])
                else:
                    log.exception("live feed failed to read new rows")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stored.wait(), POLL_SECONDS)
            stored.clear()

    async def _catch_up(self) -> None:
        if not self._subscriptions or self._last_seq is None:
            # Nobody listens: no reads; the next client starts from the newest row.
            self._last_seq = None
            return
        async with self._database.reader(queued=False) as reader:
            while True:
                rows = await reader.stored_after(self._last_seq, None, limit=READ_BATCH_ROWS)
                for stored in rows:
                    self._fan_out(stored)
                if rows:
                    self._last_seq = rows[-1].seq
                if len(rows) < READ_BATCH_ROWS:
                    return

    def _fan_out(self, stored: StoredRow) -> None:
        for subscription in list(self._subscriptions):
            if stored.row.ticker in subscription.tickers and not subscription.offer(stored):
                log.warning(
                    "stream client dropped: too far behind",
                    queued_rows=CLIENT_QUEUE_ROWS,
                    tickers=sorted(subscription.tickers),
                )
                subscription.end()
                self._subscriptions.discard(subscription)


class ResumeReset(NamedTuple):
    """A client's resume point lies beyond the newest stored row: it continues after `newest_seq`."""

    requested_seq: int
    newest_seq: int


async def events(
    feed: PriceFeed, database: ReadDatabase, tickers: Sequence[str], after_seq: int | None
) -> AsyncIterator[StoredRow | ResumeReset]:
    """The rows for one client: those stored after `after_seq` (its `Last-Event-ID`) from the
    database, then live ones, each once and in `seq` order. An `after_seq` beyond the newest
    row yields a `ResumeReset` first and continues after the newest row."""
    async with feed.subscribe(tickers) as subscription:
        sent = after_seq
        if after_seq is not None:
            async with database.reader() as reader:
                newest = await reader.newest_seq()
            if after_seq > newest:
                log.warning(
                    "stream resume point beyond the newest row: restarting the client there",
                    last_event_id=after_seq,
                    newest_seq=newest,
                )
                yield ResumeReset(after_seq, newest)
                sent = newest
        while sent is not None:
            async with database.reader() as reader:
                backlog = await reader.stored_after(sent, tickers, limit=READ_BATCH_ROWS)
            for stored in backlog:
                yield stored
                sent = stored.seq
            if len(backlog) < READ_BATCH_ROWS:
                break
        while (stored_row := await subscription.queue.get()) is not None:
            if sent is None or stored_row.seq > sent:
                yield stored_row


async def get_price_feed(request: Request) -> PriceFeed:
    feed: PriceFeed = request.app.state.price_feed
    return feed


PriceFeedDep = Annotated[PriceFeed, Depends(get_price_feed)]
