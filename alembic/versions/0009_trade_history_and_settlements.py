"""price_ticks.source 'trade', the trade back-fill's checkpoints, and settlement prices

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-02

`source` may now be `'trade'` (a price taken from the first trade in the slot). On PostgreSQL the
check is replaced on the partitioned parent (and on the partition that was the table before
0006, which kept its own copy); adding it scans the rows once to validate them. On SQLite the
rule lives in the table's SQL: it is rewritten in place (a rule that only admits more values
needs no rewrite of the rows), which keeps the table's triggers.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from crypto_client.db.models import ExactDecimal

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = "source IN ('poll', 'backfill', 'stream')"
_AFTER = "source IN ('poll', 'backfill', 'stream', 'trade')"


def _replace_source_rule(old: str, new: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE price_ticks DROP CONSTRAINT ck_price_ticks_source")
        op.execute(
            "ALTER TABLE IF EXISTS price_ticks_history DROP CONSTRAINT IF EXISTS ck_price_ticks_source"
        )
        op.execute(f"ALTER TABLE price_ticks ADD CONSTRAINT ck_price_ticks_source CHECK ({new})")
        return
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar_one()
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    bind.exec_driver_sql(
        "UPDATE sqlite_master SET sql = replace(sql, ?, ?) WHERE type = 'table' AND name = 'price_ticks'",
        (old, new),
    )
    bind.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    bind.exec_driver_sql("PRAGMA writable_schema = OFF")


def upgrade() -> None:
    _replace_source_rule(_BEFORE, _AFTER)
    op.create_table(
        "trade_backfill_days",
        sa.Column("ticker", sa.String(length=64), nullable=False),
        sa.Column("interval_seconds", sa.Integer(), nullable=False),
        sa.Column("day_ts", sa.BigInteger(), nullable=False),
        sa.Column("filled", sa.Integer(), nullable=False),
        sa.Column("no_trade", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("ticker", "interval_seconds", "day_ts", name="pk_trade_backfill_days"),
    )
    op.create_table(
        "settlement_prices",
        sa.Column("ticker", sa.String(length=64), nullable=False),
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("delivery_price", ExactDecimal(), nullable=False),
        sa.PrimaryKeyConstraint("ticker", "date", name="pk_settlement_prices"),
    )


def downgrade() -> None:
    op.drop_table("settlement_prices")
    op.drop_table("trade_backfill_days")
    op.execute("DELETE FROM price_ticks WHERE source = 'trade'")
    _replace_source_rule(_AFTER, _BEFORE)
