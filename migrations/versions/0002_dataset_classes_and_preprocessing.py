"""dataset classes and preprocessing

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""
from alembic import op
import sqlalchemy as sa
import service.db

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('classes', sa.JSON(), nullable=True))
        # Rows from before this revision had the default preprocessing: an empty spec.
        batch_op.add_column(sa.Column('preprocess', sa.JSON(), nullable=False, server_default=sa.text("'{}'")))

def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('preprocess')
        batch_op.drop_column('classes')

