"""data_origin: where the prices of this database come from

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows stored before this revision have no recorded origin: the next write records its own.
    op.create_table(
        "data_origin",
        sa.Column("origin", sa.String(length=255), nullable=False),
        sa.Column("first_write_ts", sa.BigInteger(), nullable=False),
        sa.Column("by_override", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("origin", name="pk_data_origin"),
    )
    op.create_index(
        "ix_data_origin_by_override",
        "data_origin",
        ["by_override"],
        unique=True,
        postgresql_where=sa.text("NOT by_override"),
        sqlite_where=sa.text("NOT by_override"),
    )


def downgrade() -> None:
    op.drop_index("ix_data_origin_by_override", table_name="data_origin")
    op.drop_table("data_origin")
