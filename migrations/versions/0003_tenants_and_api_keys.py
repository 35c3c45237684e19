"""tenants, API keys and the audit log

Revision ID: 0003
Revises: 0002_job_reads
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa
import service.db

revision = '0003'
down_revision = '0002_job_reads'
branch_labels = None
depends_on = None


def upgrade() -> None:
    tenants = op.create_table('tenants',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('operator', sa.Boolean(), nullable=False),
    sa.Column('max_stored_bytes', sa.BigInteger(), nullable=True),
    sa.Column('max_models', sa.Integer(), nullable=True),
    sa.Column('max_datasets', sa.Integer(), nullable=True),
    sa.Column('max_active_jobs', sa.Integer(), nullable=True),
    sa.Column('max_requests_per_minute', sa.Integer(), nullable=True),
    sa.Column('created_at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('quota_checked_at', service.db.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants'))
    )
    # Rows from before this revision all belong to "default": it exists so their quotas can be checked.
    op.bulk_insert(tenants, [{'id': 'default', 'name': 'default', 'operator': False,
                              'created_at': service.db.utcnow()}])
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('created_at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', service.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', service.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', service.db.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('prefix', name=op.f('uq_api_keys_prefix'))
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_tenant_id'), ['tenant_id'], unique=False)
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('key_prefix', sa.String(length=16), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=False),
    sa.Column('at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_events_tenant_at', ['tenant_id', 'at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_tenant_at')
    op.drop_table('audit_events')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_tenant_id'))
    op.drop_table('api_keys')
    op.drop_table('tenants')
