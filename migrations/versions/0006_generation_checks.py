"""generation_checks: the reconciler's schedule, out of the wide generations row

The reconciler's lease pushed ``generations.next_check_at`` forward on every row it
looked at: a non-HOT update of a wide row that writes a new entry in each of its five
indexes (758 bytes of WAL per row; bench/README.md). The schedule now lives in a
narrow table of its own, one row per generation with a check, and the two partial
indexes on ``next_check_at`` go with the column, so the hot path's writes of a live
generation carry one index entry fewer.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = "status IN ('processing', 'queued', 'submitted')"
_THUMBNAIL_MISSING = "status = 'completed' AND thumbnail_key IS NULL"


def upgrade() -> None:
    op.create_table(
        "generation_checks",
        sa.Column("generation_id", sa.Uuid(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["generation_id"], ["generations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("generation_id"),
    )
    op.execute(
        f"""
        INSERT INTO generation_checks (generation_id, due_at)
        SELECT id, next_check_at FROM generations
         WHERE next_check_at IS NOT NULL AND ({_LIVE} OR ({_THUMBNAIL_MISSING}))
        """
    )
    op.create_index("ix_generation_checks_due", "generation_checks", ["due_at"], unique=False)
    op.drop_index(
        "ix_generations_thumbnail_missing",
        table_name="generations",
        postgresql_where=sa.text(_THUMBNAIL_MISSING),
    )
    op.drop_index(
        "ix_generations_next_check", table_name="generations", postgresql_where=sa.text(_LIVE)
    )
    op.drop_column("generations", "next_check_at")


def downgrade() -> None:
    op.add_column(
        "generations", sa.Column("next_check_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute(
        """
        UPDATE generations g SET next_check_at = c.due_at
          FROM generation_checks c WHERE c.generation_id = g.id
        """
    )
    op.create_index(
        "ix_generations_next_check",
        "generations",
        ["next_check_at"],
        unique=False,
        postgresql_where=sa.text(_LIVE),
    )
    op.create_index(
        "ix_generations_thumbnail_missing",
        "generations",
        ["next_check_at"],
        unique=False,
        postgresql_where=sa.text(_THUMBNAIL_MISSING),
    )
    op.drop_index("ix_generation_checks_due", table_name="generation_checks")
    op.drop_table("generation_checks")
