"""usage ledger: usage.record_id (idempotent id of a request's running record) and usage.completed_at

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 16:40:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.add_column(sa.Column('record_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('completed_at', sa.DateTime(), nullable=True))
        batch_op.create_unique_constraint('uq_usage_record_id', ['record_id'])
    # Rows written before the ledger were written when their request ended: they are complete.
    op.execute("UPDATE usage SET completed_at = created_at")


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.drop_constraint('uq_usage_record_id', type_='unique')
        batch_op.drop_column('completed_at')
        batch_op.drop_column('record_id')
