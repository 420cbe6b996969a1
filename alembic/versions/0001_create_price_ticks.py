"""create price_ticks

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from crypto_client.db.models import ExactDecimal

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "price_ticks",
        sa.Column("ticker", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("price", ExactDecimal(), nullable=False),
        sa.Column("slot_ts", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("ticker", "ts", name="pk_price_ticks"),
    )
    op.create_index("ix_price_ticks_ticker_slot_ts", "price_ticks", ["ticker", "slot_ts"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_price_ticks_ticker_slot_ts", table_name="price_ticks")
    op.drop_table("price_ticks")
