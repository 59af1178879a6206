"""request ids: a retried write finds the row its first attempt made

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('messages', 'feedback_events'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('request_id', sa.String(length=100), nullable=True))
            batch_op.create_index(batch_op.f(f'ix_{table}_request_id'), ['request_id'],
                                  unique=True)


def downgrade() -> None:
    for table in ('feedback_events', 'messages'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f'ix_{table}_request_id'))
            batch_op.drop_column('request_id')
