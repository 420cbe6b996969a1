"""The schema: price observations, the tickers being tracked, the ledger of missing slots, and
the API keys."""

import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from crypto_client.domain import (
    MAX_PRICE_INTEGER_DIGITS,
    MAX_TS,
    TICKER_MAX_LENGTH,
    TICKER_PATTERN,
    plain_decimal,
)

# Revision 0002's PostgreSQL checks, which revision 0006 repeats on every time partition.
TICKER_CHECK = f"ticker ~ '{TICKER_PATTERN}'"
TS_CHECK = f"ts BETWEEN 0 AND {MAX_TS} AND (slot_ts IS NULL OR slot_ts BETWEEN 0 AND ts)"


def partition_rules(table: str) -> list[str]:
    """What PostgreSQL cannot declare on a partitioned table, declared on each partition of
    `price_ticks`: one row per ticker per slot, and the ticker and time rules."""
    return [
        f'CREATE UNIQUE INDEX "ix_{table}_ticker_slot_ts" ON "{table}" (ticker, slot_ts)',
        f'ALTER TABLE "{table}" ADD CONSTRAINT "ck_{table}_ticker" CHECK ({TICKER_CHECK})',
        f'ALTER TABLE "{table}" ADD CONSTRAINT "ck_{table}_ts" CHECK ({TS_CHECK})',
    ]


def roll_up_triggers(table: str) -> list[str]:
    """Revision 0007's PostgreSQL triggers that keep `price_candles_1h` true, on `price_ticks`
    or one of its partitions. A statement on the parent fires only the parent's statement
    triggers, and one naming a partition only that partition's, so every table gets its own."""
    return [
        f'CREATE TRIGGER price_ticks_roll_up_insert AFTER INSERT ON "{table}"'
        " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION price_ticks_roll_up_insert()",
        f'CREATE TRIGGER price_ticks_roll_up_update AFTER UPDATE ON "{table}"'
        " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION price_ticks_roll_up_update()",
        f'CREATE TRIGGER price_ticks_roll_up_delete AFTER DELETE ON "{table}"'
        " REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION price_ticks_roll_up_delete()",
        f'CREATE TRIGGER price_ticks_roll_up_truncate AFTER TRUNCATE ON "{table}"'
        " FOR EACH STATEMENT EXECUTE FUNCTION price_ticks_roll_up_truncate()",
    ]


def sqlite_price_order(price: str) -> str:
    """A text that sorts as the SQLite price text `price` (an SQL expression) does by value,
    exactly: the integer part padded to 20 digits (the domain's bound), then the point and the
    decimal places (`1.5` sorts before `1.51`; equal values written differently, `1.5` and
    `1.50`, are in either order). A REAL would round beyond 15 or 16 significant digits."""
    integer_digits = f"(CASE WHEN instr({price}, '.') THEN instr({price}, '.') - 1 ELSE length({price}) END)"
    zeros = "0" * MAX_PRICE_INTEGER_DIGITS
    return (
        f"(substr('{zeros}' || {price}, {integer_digits} + 1)"
        f" || CASE WHEN instr({price}, '.') THEN '' ELSE '.' END)"
    )


class ExactDecimal(TypeDecorator[Decimal]):
    """NUMERIC on PostgreSQL; decimal text on SQLite, whose NUMERIC would round through a float."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Text())
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> object:
        if value is None or dialect.name != "sqlite":
            return value
        # Plain text: the API copies it into JSON as it is.
        return plain_decimal(value)

    def process_result_value(self, value: object, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(str(value))


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class PriceTick(Base):
    """One observed index price.

    `(ticker, ts)` is the primary key, so a ticker's rows are found, ordered and paged by one
    index. `slot_ts` is the start of the ingestion slot that observed the row; its unique index
    keeps a slot to one row per ticker however often the slot is ingested. It is NULL for rows
    that no schedule produced.

    Revision 0002 adds database checks from `domain`: the ticker rule, `0 <= ts <= MAX_TS`
    and `slot_ts <= ts`.

    `seq` numbers rows in the order their transactions committed (revision 0004: a sequence on
    PostgreSQL, whose writers take a lock so that numbers and commits agree; a trigger on
    SQLite, counting in `price_ticks_seq` since revision 0007). A number is never reused. Live
    readers follow it and resume from it; rows older than 0004 have none.
    """

    __tablename__ = "price_ticks"

    ticker: Mapped[str] = mapped_column(String(TICKER_MAX_LENGTH), primary_key=True)
    ts: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    price: Mapped[Decimal] = mapped_column(ExactDecimal, nullable=False)
    slot_ts: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    source: Mapped[str] = mapped_column(String(16), nullable=False, server_default="poll")
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)

    __table_args__ = (Index(None, "ticker", "slot_ts", unique=True),)


class TrackedTicker(Base):
    """Since which slot a ticker has been ingested: where its expected slots begin."""

    __tablename__ = "tracked_tickers"

    ticker: Mapped[str] = mapped_column(String(TICKER_MAX_LENGTH), primary_key=True)
    since_slot_ts: Mapped[int] = mapped_column(BigInteger, nullable=False)


class SlotFailureRecord(Base):
    """The ledger: why a slot has no row, as recorded when it happened (or when back-fill
    found nothing to fill it with). A later row for the slot makes the entry moot."""

    __tablename__ = "slot_failures"

    ticker: Mapped[str] = mapped_column(String(TICKER_MAX_LENGTH), primary_key=True)
    slot_ts: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    reason: Mapped[str] = mapped_column(String(32), nullable=False)
    detail: Mapped[str] = mapped_column(Text, nullable=False, server_default="")


class HourCandle(Base):
    """The roll-up behind hour-aligned candles: one row per ticker per UTC hour with rows
    (revision 0005). The database keeps it true for every write to `price_ticks`, whoever
    makes it (revision 0007: statement triggers on PostgreSQL, row triggers on SQLite).
    Candles of an hour or more read these instead of every row."""

    __tablename__ = "price_candles_1h"

    ticker: Mapped[str] = mapped_column(String(TICKER_MAX_LENGTH), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # the hour's start
    open_ts: Mapped[int] = mapped_column(BigInteger, nullable=False)
    open: Mapped[Decimal] = mapped_column(ExactDecimal, nullable=False)
    high: Mapped[Decimal] = mapped_column(ExactDecimal, nullable=False)
    low: Mapped[Decimal] = mapped_column(ExactDecimal, nullable=False)
    close_ts: Mapped[int] = mapped_column(BigInteger, nullable=False)
    close: Mapped[Decimal] = mapped_column(ExactDecimal, nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    backfilled: Mapped[int] = mapped_column(BigInteger, nullable=False)


class SeqCounter(Base):
    """SQLite only (revision 0007): the last `seq` handed out, so that no number is handed
    out twice, even after the row that had it was deleted. PostgreSQL has a sequence."""

    __tablename__ = "price_ticks_seq"
    __table_args__ = {"info": {"sqlite_only": True}}  # noqa: RUF012 - read once by the mapper

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # the one row: 1
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)


class DataOriginRecord(Base):
    """Where this database's prices come from (revision 0008): the origin of its first write
    (`by_override` false; the partial unique index allows one such row, so two writers racing
    on an empty database cannot both claim it), and each other origin that has written here
    under `ALLOW_ORIGIN_CHANGE`, with when it first did."""

    __tablename__ = "data_origin"

    origin: Mapped[str] = mapped_column(String(255), primary_key=True)
    first_write_ts: Mapped[int] = mapped_column(BigInteger, nullable=False)
    by_override: Mapped[bool] = mapped_column(Boolean, nullable=False)

    __table_args__ = (
        Index(
            None,
            "by_override",
            unique=True,
            postgresql_where=text("NOT by_override"),
            sqlite_where=text("NOT by_override"),
        ),
    )


class TradeBackfillDay(Base):
    """A UTC day whose missing slots the trade back-fill has settled (filled, or recorded as
    `no_trade_in_slot`) at one slot interval: its checkpoint (revision 0009). A rerun skips
    these days instead of asking Deribit again."""

    __tablename__ = "trade_backfill_days"

    ticker: Mapped[str] = mapped_column(String(TICKER_MAX_LENGTH), primary_key=True)
    interval_seconds: Mapped[int] = mapped_column(Integer, primary_key=True)
    day_ts: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    filled: Mapped[int] = mapped_column(Integer, nullable=False)
    no_trade: Mapped[int] = mapped_column(Integer, nullable=False)


class SettlementPrice(Base):
    """Deribit's daily delivery price of an index, exactly as published (revision 0009). A
    settlement value, not an observation of the index: it never goes into `price_ticks`."""

    __tablename__ = "settlement_prices"

    ticker: Mapped[str] = mapped_column(String(TICKER_MAX_LENGTH), primary_key=True)
    date: Mapped[datetime.date] = mapped_column(Date, primary_key=True)
    delivery_price: Mapped[Decimal] = mapped_column(ExactDecimal, nullable=False)


class ApiKey(Base):
    """A client's API key, stored only as the sha256 of the key (a random 32-byte token, so a
    plain hash is enough: there is nothing to guess). `rate_limit` is the key's own quota in
    the `limits` syntax (NULL: `API_RATE_LIMIT`). Times are UNIX seconds; `last_used_at` is
    written in batches by the API (a minute behind at most), never once per request."""

    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False, unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_used_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    rate_limit: Mapped[str | None] = mapped_column(String(200), nullable=True)
