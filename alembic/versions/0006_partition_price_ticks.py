"""price_ticks partitioned by month on PostgreSQL; the existing table becomes its first partition

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26

The existing rows are not copied: the old table is attached as the partition `price_ticks_history`
for every time before the month after next. Its range check is validated first, in its own
transaction, under a lock that lets reads and writes go on (a scan: about 50 ms per million
rows); the swap itself (rename, new parent, attach, default partition) holds the table's
exclusive lock for milliseconds, whatever its size. Monthly partitions from then on are made
ahead of time by the storage upkeep (`ingestion/maintenance.py`); a row for a month without one
lands in `price_ticks_default` and moves when its partition is made.

PostgreSQL requires the partition key in every primary key and unique index of a partitioned
table, so the key is `ts`: the primary key `(ticker, ts)` stays whole, and the one row per
`(ticker, slot_ts)` index is declared on each partition. A slot and its row's `ts` are always in
the same month (months start at midnight, slots divide a day), so it still holds overall.
SQLite keeps one table.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

from alembic import op

from crypto_client.db.models import TICKER_CHECK, TS_CHECK, partition_rules
from crypto_client.domain import SOURCES

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_SOURCE_RULE = "source IN (" + ", ".join(f"'{source}'" for source in SOURCES) + ")"


def _month_after_next(now: datetime) -> int:
    index = now.year * 12 + now.month + 1  # zero-based month index of the month after next
    return int(datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC).timestamp())


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bound = _month_after_next(datetime.now(UTC))
    with op.get_context().autocommit_block():
        op.execute(
            "ALTER TABLE price_ticks ADD CONSTRAINT price_ticks_history_range"
            f" CHECK (ts >= 0 AND ts < {bound}) NOT VALID"
        )
        op.execute("ALTER TABLE price_ticks VALIDATE CONSTRAINT price_ticks_history_range")
    for statement in (
        "LOCK TABLE price_ticks IN ACCESS EXCLUSIVE MODE",
        "ALTER TABLE price_ticks RENAME TO price_ticks_history",
        "ALTER TABLE price_ticks_history RENAME CONSTRAINT pk_price_ticks TO pk_price_ticks_history",
        "ALTER INDEX ix_price_ticks_ticker_slot_ts RENAME TO ix_price_ticks_history_ticker_slot_ts",
        "ALTER INDEX ix_price_ticks_seq RENAME TO ix_price_ticks_history_seq",
        f"""CREATE TABLE price_ticks (
            ticker VARCHAR(64) NOT NULL,
            ts BIGINT NOT NULL,
            price NUMERIC NOT NULL,
            slot_ts BIGINT,
            source VARCHAR(16) DEFAULT 'poll' NOT NULL,
            seq BIGINT DEFAULT nextval('price_ticks_seq_seq'),
            CONSTRAINT pk_price_ticks PRIMARY KEY (ticker, ts),
            CONSTRAINT ck_price_ticks_source CHECK ({_SOURCE_RULE})
        ) PARTITION BY RANGE (ts)""",
        "CREATE INDEX ix_price_ticks_seq ON price_ticks (seq)",
        # The sequence goes with the parent, not with a partition retention may drop.
        "ALTER SEQUENCE price_ticks_seq_seq OWNED BY price_ticks.seq",
        f"ALTER TABLE price_ticks ATTACH PARTITION price_ticks_history FOR VALUES FROM (0) TO ({bound})",
        "CREATE TABLE price_ticks_default PARTITION OF price_ticks DEFAULT",
        *partition_rules("price_ticks_default"),
    ):
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # Back to one table: the partitions' rows are copied into a new plain table.
    for statement in (
        "ALTER TABLE price_ticks RENAME TO price_ticks_partitioned",
        "ALTER TABLE price_ticks_partitioned RENAME CONSTRAINT pk_price_ticks TO pk_price_ticks_partitioned",
        "ALTER INDEX ix_price_ticks_seq RENAME TO ix_price_ticks_partitioned_seq",
        "CREATE TABLE price_ticks (LIKE price_ticks_partitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
        "INSERT INTO price_ticks SELECT * FROM price_ticks_partitioned",
        "ALTER TABLE price_ticks ADD CONSTRAINT pk_price_ticks PRIMARY KEY (ticker, ts)",
        "ALTER SEQUENCE price_ticks_seq_seq OWNED BY price_ticks.seq",
        "DROP TABLE price_ticks_partitioned CASCADE",
        "CREATE UNIQUE INDEX ix_price_ticks_ticker_slot_ts ON price_ticks (ticker, slot_ts)",
        "CREATE INDEX ix_price_ticks_seq ON price_ticks (seq)",
        f"ALTER TABLE price_ticks ADD CONSTRAINT ck_price_ticks_ticker CHECK ({TICKER_CHECK}) NOT VALID",
        f"ALTER TABLE price_ticks ADD CONSTRAINT ck_price_ticks_ts CHECK ({TS_CHECK}) NOT VALID",
    ):
        op.execute(statement)
