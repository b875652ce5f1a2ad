"""generations.submitted_at: when the current attempt was handed to its provider

The submit -> completed duration metric read it from the history with one query per
batch of completions; the row now carries it, set by the ``submitted`` transition like
``completed_at`` by ``completed``. Live rows get theirs from the history.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 02:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "generations", sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute(
        """
        UPDATE generations g
           SET submitted_at = (
               SELECT e.created_at FROM generation_events e
                WHERE e.generation_id = g.id AND e.attempt = g.attempt
                  AND e.status = 'submitted'
                ORDER BY e.id DESC
                LIMIT 1)
         WHERE g.status IN ('submitted', 'processing')
        """
    )


def downgrade() -> None:
    op.drop_column("generations", "submitted_at")
