"""cancelling is a job status (it replaces the cancel_requested flag); the status column only holds known statuses

Revision ID: 0011_cancelling
Revises: 0010_webhooks
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = '0011_cancelling'
down_revision = '0010_webhooks'
branch_labels = None
depends_on = None

# Frozen copy of service.jobs.states.JobStatus as of this revision: a migration must not change
# meaning when the application code does.
STATUSES = ('queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled')
STATUS_CHECK = "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")"

jobs = sa.table('jobs', sa.column('status', sa.String), sa.column('cancel_requested', sa.Boolean))


def upgrade() -> None:
    # A running job whose cancel was asked is what `cancelling` means.
    op.execute(jobs.update().where(jobs.c.status == 'running', jobs.c.cancel_requested.is_(True)).values(status='cancelling'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('cancel_requested')
        batch_op.create_check_constraint('ck_jobs_status', STATUS_CHECK)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('ck_jobs_status', type_='check')
        batch_op.add_column(sa.Column('cancel_requested', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute(jobs.update().where(jobs.c.status == 'cancelling').values(status='running', cancel_requested=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('cancel_requested', server_default=None)
