"""The only way to write: `write_transaction` and its `PriceWriter` (prices, tracking, the
slot ledger, retention), which checks the writer's data origin (`db.origins`)."""

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import ClassVar

from sqlalchemy import BigInteger, Integer, String, bindparam, delete, func, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from crypto_client import metrics
from crypto_client.db.changes import CHANNEL, announce_stored
from crypto_client.db.origins import OriginRegistry
from crypto_client.db.tables import price_ticks, slot_failures, tracked_tickers
from crypto_client.domain import NewPrice, SlotFailure

_c = price_ticks.c
# pg_advisory_xact_lock's key: any constant no other lock of this database uses.
_WRITERS_LOCK_KEY = 0x70726963  # "pric"


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator["PriceWriter"]:
    """One write transaction; once it has committed rows, live readers are woken."""
    with metrics.DATABASE_WRITE_DURATION.time():
        async with engine.begin() as connection:
            writer = PriceWriter(connection)
            yield writer
    if writer.stored_rows:
        announce_stored()


def _upsert_failure(insert: postgresql.Insert | sqlite.Insert) -> Executable:
    return insert.on_conflict_do_update(
        index_elements=[slot_failures.c.ticker, slot_failures.c.slot_ts],
        set_={"reason": insert.excluded.reason, "detail": insert.excluded.detail},
    )


_oldest = (
    select(_c.ticker, _c.ts)
    .where(_c.ticker == bindparam("ticker", type_=String), _c.ts < bindparam("cutoff", type_=BigInteger))
    .order_by(_c.ts)
    .limit(bindparam("limit", type_=Integer))
)


class PriceWriter:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection
        self.stored_rows = False
        self._origin_checked: set[bool] = set()  # the `claim` values checked in this transaction

    @property
    def connection(self) -> AsyncConnection:
        """The transaction's connection, for what other tables record along with the rows."""
        return self._connection

    async def _check_origin(self, *, claim: bool) -> None:
        """The writer's declared origin against the database's (see `db.origins`), once per
        transaction; `claim`: prices follow, so their origin may become the database's."""
        if claim in self._origin_checked or True in self._origin_checked:
            return
        await OriginRegistry(self._connection).check_declared(claim=claim)
        self._origin_checked.add(claim)

    _SERIALIZE_WRITERS = select(func.pg_advisory_xact_lock(_WRITERS_LOCK_KEY))
    _INSERT: ClassVar[Mapping[str, Executable]] = {
        "postgresql": postgresql.insert(price_ticks).on_conflict_do_nothing().returning(_c.ticker, _c.ts),
        "sqlite": sqlite.insert(price_ticks).on_conflict_do_nothing().returning(_c.ticker, _c.ts),
    }
    _NOTIFY_STORED = select(func.pg_notify(CHANNEL, ""))

    async def insert_many(self, prices: Sequence[NewPrice]) -> list[tuple[str, int]]:
        """Insert `prices`, skipping any whose `(ticker, ts)` or `(ticker, slot_ts)` is taken.

        Returns the `(ticker, ts)` of the rows that were new. The caller owns the transaction.
        """
        if not prices:
            return []
        await self._check_origin(claim=True)
        dialect = self._connection.dialect.name
        if dialect == "postgresql" and not self.stored_rows:
            # Writers take `seq` numbers and commit one at a time, so a number is visible only
            # after every smaller one: a live reader that resumes after `seq` misses nothing.
            await self._connection.execute(self._SERIALIZE_WRITERS)
        # One compiled statement, sent as multi-row VALUES batches (SQLAlchemy's insertmanyvalues).
        result = await self._connection.execute(self._INSERT[dialect], [price._asdict() for price in prices])
        # The database's triggers fold them into the candle roll-up (revision 0007).
        new_rows = [(ticker, ts) for ticker, ts in result]
        if not new_rows:
            return []
        if not self.stored_rows and dialect == "postgresql":
            await self._connection.execute(self._NOTIFY_STORED)  # delivered when the transaction commits
        self.stored_rows = True
        return new_rows

    _ROWS_AT = select(_c.ticker, _c.ts, _c.price, _c.slot_ts, _c.source).where(
        tuple_(_c.ticker, _c.ts).in_(bindparam("keys", expanding=True))
    )

    async def stored_exactly(self, prices: Sequence[NewPrice]) -> set[tuple[str, int]]:
        """The `(ticker, ts)` of those `prices` the table holds exactly as given (same slot,
        price and source): how a writer whose COMMIT went unanswered recognises its own rows."""
        if not prices:
            return set()
        keys = [(price.ticker, price.ts) for price in prices]
        result = await self._connection.execute(self._ROWS_AT, {"keys": keys})
        stored = {(ticker, ts): (price, slot_ts, source) for ticker, ts, price, slot_ts, source in result}
        return {
            (price.ticker, price.ts)
            for price in prices
            if stored.get((price.ticker, price.ts)) == (price.price, price.slot_ts, price.source)
        }

    _TRACK: ClassVar[Mapping[str, Executable]] = {
        "postgresql": postgresql.insert(tracked_tickers).on_conflict_do_nothing(),
        "sqlite": sqlite.insert(tracked_tickers).on_conflict_do_nothing(),
    }

    async def track(self, tickers: Sequence[str], since_slot_ts: int) -> None:
        """Start tracking `tickers` at `since_slot_ts`, unless they are tracked already."""
        if tickers:
            await self._check_origin(claim=False)
            await self._connection.execute(
                self._TRACK[self._connection.dialect.name],
                [{"ticker": ticker, "since_slot_ts": since_slot_ts} for ticker in tickers],
            )

    _DELETE_OLDER = delete(price_ticks).where(tuple_(_c.ticker, _c.ts).in_(_oldest))

    async def delete_older(self, ticker: str, cutoff: int, *, limit: int) -> int:
        """Delete up to `limit` of `ticker`'s rows with `ts < cutoff`, oldest first; returns
        how many (fewer than `limit`: none is left)."""
        result = await self._connection.execute(
            self._DELETE_OLDER, {"ticker": ticker, "cutoff": cutoff, "limit": limit}
        )
        return int(result.rowcount)

    async def expire_before(self, first_slot: int) -> None:
        """What describes rows before `first_slot` goes with them: their ledger entries
        (their roll-up hours went with the rows: the database's triggers); tracking starts
        again at `first_slot`, so that coverage does not count the removed slots as missing."""
        await self._connection.execute(delete(slot_failures).where(slot_failures.c.slot_ts < first_slot))
        await self._connection.execute(
            update(tracked_tickers)
            .where(tracked_tickers.c.since_slot_ts < first_slot)
            .values(since_slot_ts=first_slot)
        )

    _RECORD_FAILURE: ClassVar[Mapping[str, Executable]] = {
        "postgresql": _upsert_failure(postgresql.insert(slot_failures)),
        "sqlite": _upsert_failure(sqlite.insert(slot_failures)),
    }

    async def record_failures(self, failures: Sequence[SlotFailure]) -> None:
        """Write ledger entries; a slot's newer entry replaces its older one."""
        if failures:
            await self._check_origin(claim=False)
            await self._connection.execute(
                self._RECORD_FAILURE[self._connection.dialect.name],
                [failure._asdict() for failure in failures],
            )
