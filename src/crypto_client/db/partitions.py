"""Upkeep of `price_ticks`'s time partitions on PostgreSQL (revision 0006), with the rules
every partition repeats from `models`."""

import re
from typing import NamedTuple

from sqlalchemy import BigInteger, bindparam, delete, text
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.models import partition_rules, roll_up_triggers
from crypto_client.db.tables import hour_candles

_BOUND = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")
# How long creating or dropping a partition waits for its exclusive lock.
_LOCK_TIMEOUT = "200ms"


class Partition(NamedTuple):
    name: str
    lower: int  # inclusive, UNIX seconds
    upper: int  # exclusive


class PartitionAdmin:
    """Upkeep of `price_ticks`'s time partitions on PostgreSQL (revision 0006): listing,
    creating ahead of time, dropping. DDL with names and bounds this class makes itself."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def partitioned(self) -> bool:
        if self._connection.dialect.name != "postgresql":
            return False
        kind = await self._connection.scalar(
            text("SELECT relkind::text FROM pg_class WHERE oid = 'price_ticks'::regclass")
        )
        return bool(kind == "p")

    _RANGE_PARTITIONS = text(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'price_ticks'::regclass"
    )

    async def range_partitions(self) -> list[Partition]:
        """The partitions with bounds (not the default one), oldest first."""
        result = await self._connection.execute(self._RANGE_PARTITIONS)
        found = []
        for name, bound in result:
            match = _BOUND.search(bound)
            if match is not None:
                found.append(Partition(name, int(match.group(1)), int(match.group(2))))
        return sorted(found, key=lambda partition: partition.lower)

    async def create(self, partition: Partition) -> int:
        """Create `partition` and move into it the rows the default partition holds for its
        range (they arrived before it existed); returns how many moved. The default partition
        takes no rows meanwhile: none can slip between the copy and the delete. Attaching
        locks the default partition for an instant: see `_wait_briefly_for_locks`."""
        name, lower, upper = self._quote(partition.name), int(partition.lower), int(partition.upper)
        primary_key, in_range = self._quote("pk_" + partition.name), self._quote(partition.name + "_range")
        await self._wait_briefly_for_locks()
        # Only names and integers this class made go into these statements.
        for statement in (
            "LOCK TABLE price_ticks_default IN SHARE ROW EXCLUSIVE MODE",
            f"CREATE TABLE {name} (LIKE price_ticks INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
            f"ALTER TABLE {name} ADD CONSTRAINT {primary_key} PRIMARY KEY (ticker, ts)",
            # Lets ATTACH skip its scan.
            f"ALTER TABLE {name} ADD CONSTRAINT {in_range} CHECK (ts >= {lower} AND ts < {upper})",
            *partition_rules(partition.name),
        ):
            await self._connection.execute(text(statement))
        moved = await self._connection.execute(
            text(
                "WITH moved AS (DELETE FROM price_ticks_default"  # noqa: S608 - see above
                f" WHERE ts >= {lower} AND ts < {upper} RETURNING *) INSERT INTO {name} SELECT * FROM moved"
            )
        )
        await self._connection.execute(
            text(f"ALTER TABLE price_ticks ATTACH PARTITION {name} FOR VALUES FROM ({lower}) TO ({upper})")
        )
        for trigger in roll_up_triggers(partition.name):
            await self._connection.execute(text(trigger))
        if moved.rowcount:
            # Deleting them from the default partition took their hours out of the roll-up
            # while the new partition was not yet attached: put them back from the rows.
            await self._connection.execute(
                text(
                    "SELECT price_candles_1h_recompute(array_agg(ticker), array_agg(bucket))"  # noqa: S608
                    f" FROM (SELECT DISTINCT ticker, ts - ts % 3600 AS bucket FROM {name}) hours"
                )
            )
        return int(moved.rowcount)

    _DROP_HOURS = delete(hour_candles).where(
        hour_candles.c.bucket >= bindparam("lower", type_=BigInteger),
        hour_candles.c.bucket < bindparam("upper", type_=BigInteger),
    )

    async def drop(self, partition: Partition) -> None:
        """Drop `partition` and its roll-up hours (a DROP fires no trigger; partitions hold
        whole hours). (DETACH ... CONCURRENTLY would take no exclusive lock, but PostgreSQL
        refuses it beside a default partition.)"""
        await self._wait_briefly_for_locks()
        await self._connection.execute(text(f"DROP TABLE {self._quote(partition.name)}"))
        await self._connection.execute(
            self._DROP_HOURS, {"lower": int(partition.lower), "upper": int(partition.upper)}
        )

    async def _wait_briefly_for_locks(self) -> None:
        # Creating and dropping partitions take exclusive locks for an instant, but a lock
        # request waits behind running queries and new queries queue behind it: give up
        # after `_LOCK_TIMEOUT` (the statement fails with a lock timeout; try again later).
        await self._connection.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))

    def _quote(self, identifier: str) -> str:
        return str(self._connection.dialect.identifier_preparer.quote(identifier))
