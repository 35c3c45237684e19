"""datasets.labels: a summary of each task label kind a dataset carries (boxes, masks, ...)

Revision ID: 0013_dataset_labels
Revises: 0012_model_task
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa

revision = '0013_dataset_labels'
down_revision = '0012_model_task'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: a dataset uploaded before this revision carries no task labels (its class ids stay).
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('labels', sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('labels')
