"""The database keeps the candle roll-up true for every write, and never reuses a seq

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

Until now the writer kept `price_candles_1h` in its inserting transaction, so rows written by
`psql`, `COPY`, a restore or a hand `UPDATE`/`DELETE` left it wrong. From here on triggers keep
it, and the roll-up is built again from the rows (it may be wrong already):

- PostgreSQL: statement triggers with transition tables on `price_ticks` and on each of its
  partitions (a statement fires the triggers of the table it names, only). Inserts are folded
  into their hours in one statement; updates and deletes recompute the hours they touched
  from the rows; a TRUNCATE removes the hours left without rows.
- SQLite: row triggers. An insert is folded into its hour; a delete takes its row out of the
  hour, reading the hour's rows only when the row was its open, close, high or low. Prices
  are compared exactly (`sqlite_price_order`), no longer as REAL.

SQLite's `seq` came from `max(seq) + 1`, which hands out again the number of a deleted newest
row; it now counts in `price_ticks_seq`, from the largest number ever stored.
"""

# ruff: noqa: S608 - the statements are built from this file's constants only

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from crypto_client.db.models import roll_up_triggers, sqlite_price_order

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = "ticker, bucket, open_ts, open, high, low, close_ts, close, rows, backfilled"
_FUNCTIONS = (
    "price_ticks_roll_up_insert()",
    "price_ticks_roll_up_update()",
    "price_ticks_roll_up_delete()",
    "price_ticks_roll_up_truncate()",
    "price_candles_1h_recompute(text[], bigint[])",
)

_POSTGRES_FUNCTIONS = [
    # The hours given as (ticker, bucket) pairs, recomputed from the rows; an hour without
    # rows has no roll-up row. Delete, then insert: a concurrent insert into one of these
    # hours waits for the deleted row's lock and then merges into the new one.
    f"""
    CREATE FUNCTION price_candles_1h_recompute(hour_tickers text[], hour_buckets bigint[])
    RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM price_candles_1h c USING unnest(hour_tickers, hour_buckets) AS h(ticker, bucket)
        WHERE c.ticker = h.ticker AND c.bucket = h.bucket;
        INSERT INTO price_candles_1h ({_COLUMNS})
        SELECT h.ticker, h.bucket, a.open_ts, o.price, a.high, a.low, a.close_ts, c.price,
               a.rows, a.backfilled
        FROM (SELECT DISTINCT ticker, bucket FROM unnest(hour_tickers, hour_buckets) AS u(ticker, bucket)) h
        CROSS JOIN LATERAL (
            SELECT min(ts) AS open_ts, max(ts) AS close_ts, max(price) AS high, min(price) AS low,
                   count(*) AS rows, count(*) FILTER (WHERE source = 'backfill') AS backfilled
            FROM price_ticks t WHERE t.ticker = h.ticker AND t.ts BETWEEN h.bucket AND h.bucket + 3599) a
        JOIN price_ticks o ON o.ticker = h.ticker AND o.ts = a.open_ts
        JOIN price_ticks c ON c.ticker = h.ticker AND c.ts = a.close_ts;
    END $$
    """,
    # (`kept`, not `old`: OLD is the trigger's own record.)
    f"""
    CREATE FUNCTION price_ticks_roll_up_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO price_candles_1h AS kept ({_COLUMNS})
        SELECT a.ticker, a.bucket, a.open_ts, o.price, a.high, a.low, a.close_ts, c.price,
               a.rows, a.backfilled
        FROM (SELECT ticker, ts - ts % 3600 AS bucket, min(ts) AS open_ts, max(ts) AS close_ts,
                     max(price) AS high, min(price) AS low, count(*) AS rows,
                     count(*) FILTER (WHERE source = 'backfill') AS backfilled
              FROM new_rows GROUP BY 1, 2) a
        JOIN new_rows o ON o.ticker = a.ticker AND o.ts = a.open_ts
        JOIN new_rows c ON c.ticker = a.ticker AND c.ts = a.close_ts
        ORDER BY a.ticker, a.bucket  -- hours locked in one order: concurrent writers cannot deadlock
        ON CONFLICT (ticker, bucket) DO UPDATE SET
            open_ts = least(kept.open_ts, excluded.open_ts),
            open = CASE WHEN excluded.open_ts < kept.open_ts THEN excluded.open ELSE kept.open END,
            close_ts = greatest(kept.close_ts, excluded.close_ts),
            close = CASE WHEN excluded.close_ts > kept.close_ts THEN excluded.close ELSE kept.close END,
            high = greatest(kept.high, excluded.high),
            low = least(kept.low, excluded.low),
            rows = kept.rows + excluded.rows,
            backfilled = kept.backfilled + excluded.backfilled;
        RETURN NULL;
    END $$
    """,
    """
    CREATE FUNCTION price_ticks_roll_up_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM price_candles_1h_recompute(array_agg(ticker), array_agg(bucket))
        FROM (SELECT ticker, ts - ts % 3600 AS bucket FROM old_rows
              UNION SELECT ticker, ts - ts % 3600 FROM new_rows) hours;
        RETURN NULL;
    END $$
    """,
    """
    CREATE FUNCTION price_ticks_roll_up_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM price_candles_1h_recompute(array_agg(ticker), array_agg(bucket))
        FROM (SELECT DISTINCT ticker, ts - ts % 3600 AS bucket FROM old_rows) hours;
        RETURN NULL;
    END $$
    """,
    """
    CREATE FUNCTION price_ticks_roll_up_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM price_candles_1h c WHERE NOT EXISTS (
            SELECT FROM price_ticks t
            WHERE t.ticker = c.ticker AND t.ts BETWEEN c.bucket AND c.bucket + 3599);
        RETURN NULL;
    END $$
    """,
]

_POSTGRES_REBUILD = f"""
    INSERT INTO price_candles_1h ({_COLUMNS})
    SELECT a.ticker, a.bucket, a.open_ts, o.price, a.high, a.low, a.close_ts, c.price, a.rows, a.backfilled
    FROM (SELECT ticker, ts - ts % 3600 AS bucket, min(ts) AS open_ts, max(ts) AS close_ts,
                 max(price) AS high, min(price) AS low, count(*) AS rows,
                 count(*) FILTER (WHERE source = 'backfill') AS backfilled
          FROM price_ticks GROUP BY 1, 2) a
    JOIN price_ticks o ON o.ticker = a.ticker AND o.ts = a.open_ts
    JOIN price_ticks c ON c.ticker = a.ticker AND c.ts = a.close_ts
"""


def _sqlite_hour(row: str) -> str:
    return f"{row}.ts - {row}.ts % 3600"


def _sqlite_in_hour(row: str) -> str:
    return f"ticker = {row}.ticker AND ts BETWEEN {_sqlite_hour(row)} AND {_sqlite_hour(row)} + 3599"


def _sqlite_add(row: str) -> str:
    """Fold `row` (NEW) into its hour."""
    return f"""
    INSERT INTO price_candles_1h ({_COLUMNS})
    VALUES ({row}.ticker, {_sqlite_hour(row)}, {row}.ts, {row}.price, {row}.price, {row}.price,
            {row}.ts, {row}.price, 1, {row}.source = 'backfill')
    ON CONFLICT (ticker, bucket) DO UPDATE SET
        open_ts = min(open_ts, excluded.open_ts),
        open = CASE WHEN excluded.open_ts < open_ts THEN excluded.open ELSE open END,
        close_ts = max(close_ts, excluded.close_ts),
        close = CASE WHEN excluded.close_ts > close_ts THEN excluded.close ELSE close END,
        high = CASE WHEN {sqlite_price_order("excluded.high")} > {sqlite_price_order("high")}
               THEN excluded.high ELSE high END,
        low = CASE WHEN {sqlite_price_order("excluded.low")} < {sqlite_price_order("low")}
              THEN excluded.low ELSE low END,
        rows = rows + 1,
        backfilled = backfilled + excluded.backfilled;
    """


def _sqlite_remove(row: str) -> str:
    """Take `row` (OLD, no longer in the table) out of its hour: the hour's rows are read
    only to find a new open, close, high or low, when `row` was one of them (the roll-up's
    prices are texts copied from rows: the same text is the same row's, or an equal one's)."""
    in_hour, key = _sqlite_in_hour(row), sqlite_price_order
    return f"""
    DELETE FROM price_candles_1h WHERE ticker = {row}.ticker AND bucket = {_sqlite_hour(row)}
        AND NOT EXISTS (SELECT 1 FROM price_ticks WHERE {in_hour});
    UPDATE price_candles_1h SET
        open_ts = CASE WHEN open_ts = {row}.ts
                  THEN (SELECT ts FROM price_ticks WHERE {in_hour} ORDER BY ts LIMIT 1) ELSE open_ts END,
        open = CASE WHEN open_ts = {row}.ts
               THEN (SELECT price FROM price_ticks WHERE {in_hour} ORDER BY ts LIMIT 1) ELSE open END,
        close_ts = CASE WHEN close_ts = {row}.ts
                   THEN (SELECT ts FROM price_ticks WHERE {in_hour} ORDER BY ts DESC LIMIT 1)
                   ELSE close_ts END,
        close = CASE WHEN close_ts = {row}.ts
                THEN (SELECT price FROM price_ticks WHERE {in_hour} ORDER BY ts DESC LIMIT 1) ELSE close END,
        high = CASE WHEN high = {row}.price
               THEN (SELECT price FROM price_ticks WHERE {in_hour} ORDER BY {key("price")} DESC LIMIT 1)
               ELSE high END,
        low = CASE WHEN low = {row}.price
              THEN (SELECT price FROM price_ticks WHERE {in_hour} ORDER BY {key("price")} LIMIT 1)
              ELSE low END,
        rows = rows - 1,
        backfilled = backfilled - ({row}.source = 'backfill')
    WHERE ticker = {row}.ticker AND bucket = {_sqlite_hour(row)};
    """


_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER price_ticks_roll_up_insert AFTER INSERT ON price_ticks BEGIN {_sqlite_add('NEW')} END",
    "CREATE TRIGGER price_ticks_roll_up_delete AFTER DELETE ON price_ticks"
    f" BEGIN {_sqlite_remove('OLD')} END",
    # Not OF seq: numbering a new row updates it.
    "CREATE TRIGGER price_ticks_roll_up_update AFTER UPDATE OF ticker, ts, price, source ON price_ticks"
    f" BEGIN {_sqlite_remove('OLD')} {_sqlite_add('NEW')} END",
]

_SQLITE_REBUILD = f"""
    INSERT INTO price_candles_1h ({_COLUMNS})
    SELECT a.ticker, a.bucket, a.open_ts,
           (SELECT price FROM price_ticks WHERE ticker = a.ticker AND ts = a.open_ts),
           (SELECT price FROM price_ticks WHERE ticker = a.ticker AND ts BETWEEN a.bucket AND a.bucket + 3599
            ORDER BY {sqlite_price_order("price")} DESC LIMIT 1),
           (SELECT price FROM price_ticks WHERE ticker = a.ticker AND ts BETWEEN a.bucket AND a.bucket + 3599
            ORDER BY {sqlite_price_order("price")} LIMIT 1),
           a.close_ts,
           (SELECT price FROM price_ticks WHERE ticker = a.ticker AND ts = a.close_ts),
           a.rows, a.backfilled
    FROM (SELECT ticker, ts - ts % 3600 AS bucket, min(ts) AS open_ts, max(ts) AS close_ts,
                 count(*) AS rows, sum(source = 'backfill') AS backfilled
          FROM price_ticks GROUP BY 1, 2) a
"""

# Without its row (emptied by hand), the count starts again after the largest number stored.
_SQLITE_NUMBERING = """
CREATE TRIGGER price_ticks_number_rows AFTER INSERT ON price_ticks
BEGIN
    INSERT INTO price_ticks_seq (id, last_seq) VALUES (1, (SELECT coalesce(max(seq), 0) + 1 FROM price_ticks))
    ON CONFLICT (id) DO UPDATE SET last_seq = last_seq + 1;
    UPDATE price_ticks SET seq = (SELECT last_seq FROM price_ticks_seq WHERE id = 1) WHERE rowid = NEW.rowid;
END
"""
# Revision 0004's.
_SQLITE_OLD_NUMBERING = """
CREATE TRIGGER price_ticks_number_rows AFTER INSERT ON price_ticks
BEGIN
    UPDATE price_ticks
    SET seq = (SELECT coalesce(max(seq), 0) + 1 FROM price_ticks)
    WHERE rowid = NEW.rowid;
END
"""

_PARTITIONS = "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'price_ticks'::regclass"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # No write may slip between the rebuild and the triggers.
        op.execute("LOCK TABLE price_ticks IN SHARE ROW EXCLUSIVE MODE")
        for function in _POSTGRES_FUNCTIONS:
            op.execute(function)
        tables = ["price_ticks", *(name.strip('"') for (name,) in bind.exec_driver_sql(_PARTITIONS))]
        for table in tables:
            for trigger in roll_up_triggers(table):
                op.execute(trigger)
        op.execute("DELETE FROM price_candles_1h")
        op.execute(_POSTGRES_REBUILD)
        return
    op.create_table(
        "price_ticks_seq",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_price_ticks_seq"),
    )
    op.execute("INSERT INTO price_ticks_seq (id, last_seq) SELECT 1, coalesce(max(seq), 0) FROM price_ticks")
    op.execute("DROP TRIGGER price_ticks_number_rows")
    op.execute(_SQLITE_NUMBERING)
    for trigger in _SQLITE_TRIGGERS:
        op.execute(trigger)
    op.execute("DELETE FROM price_candles_1h")
    op.execute(_SQLITE_REBUILD)


def downgrade() -> None:
    # Revision 0006's writer keeps the roll-up itself again; it stays as the triggers left it.
    if op.get_bind().dialect.name == "postgresql":
        for function in _FUNCTIONS:
            op.execute(f"DROP FUNCTION {function} CASCADE")
        return
    for trigger in ("price_ticks_roll_up_insert", "price_ticks_roll_up_delete", "price_ticks_roll_up_update"):
        op.execute(f"DROP TRIGGER {trigger}")
    op.execute("DROP TRIGGER price_ticks_number_rows")
    op.execute(_SQLITE_OLD_NUMBERING)
    op.drop_table("price_ticks_seq")
