"""price_ticks: the ticker rule and the time range as database checks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

from crypto_client.domain import MAX_TS, TICKER_MAX_LENGTH, TICKER_PATTERN

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS_RANGE = f"ts BETWEEN 0 AND {MAX_TS} AND (slot_ts IS NULL OR slot_ts BETWEEN 0 AND ts)"


def _ticker_rule(dialect: str) -> str:
    if dialect == "postgresql":
        return f"ticker ~ '{TICKER_PATTERN}'"
    # SQLite has no regular expressions: the same rule with GLOB.
    return (
        f"length(ticker) BETWEEN 1 AND {TICKER_MAX_LENGTH}"
        " AND substr(ticker, 1, 1) GLOB '[a-z0-9]' AND ticker NOT GLOB '*[^a-z0-9_-]*'"
    )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        # NOT VALID: rows written before this revision are kept as they are (no table scan
        # under lock); every new row is checked.
        for name, rule in (
            ("ck_price_ticks_ticker", _ticker_rule(dialect)),
            ("ck_price_ticks_ts", _TS_RANGE),
        ):
            op.execute(f"ALTER TABLE price_ticks ADD CONSTRAINT {name} CHECK ({rule}) NOT VALID")
        return
    with op.batch_alter_table("price_ticks") as batch:
        batch.create_check_constraint("ck_price_ticks_ticker", _ticker_rule(dialect))
        batch.create_check_constraint("ck_price_ticks_ts", _TS_RANGE)


def downgrade() -> None:
    with op.batch_alter_table("price_ticks") as batch:
        batch.drop_constraint("ck_price_ticks_ts", type_="check")
        batch.drop_constraint("ck_price_ticks_ticker", type_="check")
