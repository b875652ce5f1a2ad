"""generations.runner: who runs a processing job, on the row

The reconciler asks a processing job's runner (a GPU worker, a hosted runner) whether
it still holds the job (``core.heartbeats``). It found the runner with one history query
per tick (the source of each row's last ``processing`` event); now the lease returns it
with the row. Rows processing when this runs get theirs from that same history.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate emits sqlmodel types)
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "generations",
        sa.Column("runner", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    )
    op.execute(
        """
        UPDATE generations g
           SET runner = (
               SELECT e.detail->>'source' FROM generation_events e
                WHERE e.generation_id = g.id AND e.attempt = g.attempt
                  AND e.status = 'processing'
                ORDER BY e.id DESC
                LIMIT 1)
         WHERE g.status = 'processing'
        """
    )


def downgrade() -> None:
    op.drop_column("generations", "runner")
