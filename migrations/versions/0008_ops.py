"""operations: the request id that created a job, the step-duration histogram

Revision ID: 0008_ops
Revises: 0007_upload_sessions
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = '0008_ops'
down_revision = '0007_upload_sessions'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_id', sa.String(length=128), nullable=True))
    op.create_table('step_durations',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('step_type', sa.String(length=64), nullable=False),
    sa.Column('method', sa.String(length=64), nullable=False),
    sa.Column('le', sa.String(length=16), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.Column('seconds_sum', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', 'step_type', 'method', 'le', name=op.f('pk_step_durations'))
    )


def downgrade() -> None:
    op.drop_table('step_durations')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('request_id')
