"""price_ticks.seq: the order rows were stored in, for live readers and their resume

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rows stored before this revision keep a NULL seq: no rewrite of a big table under lock, and
# a live reader only ever asks for rows stored after it connected.
_SQLITE_NUMBERING = """
CREATE TRIGGER price_ticks_number_rows AFTER INSERT ON price_ticks
BEGIN
    UPDATE price_ticks
    SET seq = (SELECT coalesce(max(seq), 0) + 1 FROM price_ticks)
    WHERE rowid = NEW.rowid;
END
"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column("price_ticks", sa.Column("seq", sa.BigInteger(), nullable=True))
    if dialect == "postgresql":
        op.execute("CREATE SEQUENCE price_ticks_seq_seq OWNED BY price_ticks.seq")
        op.execute("ALTER TABLE price_ticks ALTER COLUMN seq SET DEFAULT nextval('price_ticks_seq_seq')")
    else:
        # SQLite has one writer at a time, so numbering inside the insert is in commit order.
        op.execute(_SQLITE_NUMBERING)
    op.create_index("ix_price_ticks_seq", "price_ticks", ["seq"])


def downgrade() -> None:
    op.drop_index("ix_price_ticks_seq", table_name="price_ticks")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER price_ticks_number_rows")
    with op.batch_alter_table("price_ticks") as batch:
        batch.drop_column("seq")
