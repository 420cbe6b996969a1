"""price_ticks.source, tracked_tickers and the slot_failures ledger

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from crypto_client.domain import SOURCES

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SOURCE_RULE = "source IN (" + ", ".join(f"'{source}'" for source in SOURCES) + ")"


def upgrade() -> None:
    # A server default fills existing rows without rewriting them (PostgreSQL 11+): every row
    # before this revision was polled.
    with op.batch_alter_table("price_ticks") as batch:
        batch.add_column(sa.Column("source", sa.String(length=16), server_default="poll", nullable=False))
        batch.create_check_constraint("ck_price_ticks_source", _SOURCE_RULE)
    op.create_table(
        "tracked_tickers",
        sa.Column("ticker", sa.String(length=64), nullable=False),
        sa.Column("since_slot_ts", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("ticker", name="pk_tracked_tickers"),
    )
    op.create_table(
        "slot_failures",
        sa.Column("ticker", sa.String(length=64), nullable=False),
        sa.Column("slot_ts", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("ticker", "slot_ts", name="pk_slot_failures"),
    )


def downgrade() -> None:
    op.drop_table("slot_failures")
    op.drop_table("tracked_tickers")
    with op.batch_alter_table("price_ticks") as batch:
        batch.drop_constraint("ck_price_ticks_source", type_="check")
        batch.drop_column("source")
