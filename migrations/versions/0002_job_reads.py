"""job reads: headline figures for the list, an index for the list filtered by status

Revision ID: 0002_job_reads
Revises: 0002
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = '0002_job_reads'
down_revision = '0002'
branch_labels = None
depends_on = None

jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('metrics', sa.JSON), sa.column('headline', sa.JSON))


def _headline(metrics: dict) -> dict | None:
    # Frozen copy of service.jobs.service.headline_of as of this revision: a migration must not
    # change meaning when the application code does.
    comparison, compressed = metrics.get('comparison') or {}, metrics.get('compressed') or {}
    keys = ('size_ratio', 'speedup_batch_1', 'accuracy_drop')
    figures = {key: comparison.get(key) for key in keys} | {'compressed_size_bytes': compressed.get('size_bytes')}
    return figures if any(v is not None for v in figures.values()) else None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('headline', sa.JSON(), nullable=True))
        batch_op.create_index('ix_jobs_tenant_status_created', ['tenant_id', 'status', 'created_at', 'id'], unique=False)
    connection = op.get_bind()
    for job_id, metrics in connection.execute(sa.select(jobs.c.id, jobs.c.metrics)).all():
        headline = _headline(metrics) if isinstance(metrics, dict) else None
        if headline is not None:
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(headline=headline))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_status_created')
        batch_op.drop_column('headline')
