"""models.task: the task given at upload, used by a job that gives none

Revision ID: 0012_model_task
Revises: 0011_cancelling
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa

revision = '0012_model_task'
down_revision = '0011_cancelling'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: every model uploaded before this revision has no task (its jobs infer one).
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('task', sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('task')
