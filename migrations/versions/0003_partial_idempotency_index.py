"""idempotency keys: a partial unique index instead of a unique constraint

The constraint indexed every row, keyless ones included (``(user_id, NULL)``), so every
write of a generation that is not a HOT update (each status change, each reconciler
lease) also inserted into it: for a user with many generations, into one long run of
equal keys. Only rows with a key need the index. Measured on 1,000,000 rows, a
1,000-row lease went from ~23 ms to ~15 ms of Postgres time (bench/README.md).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 01:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Built before the constraint goes, so keys stay unique throughout the transaction.
    op.create_index(
        "ix_generations_idempotency_key",
        "generations",
        ["user_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_constraint("generations_idempotency_key", "generations", type_="unique")


def downgrade() -> None:
    op.create_unique_constraint(
        "generations_idempotency_key", "generations", ["user_id", "idempotency_key"]
    )
    op.drop_index(
        "ix_generations_idempotency_key",
        table_name="generations",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
