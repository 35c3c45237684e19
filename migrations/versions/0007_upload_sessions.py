"""resumable upload sessions and their parts

Revision ID: 0007_upload_sessions
Revises: 0003
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa
import service.db

revision = '0007_upload_sessions'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('upload_sessions',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('fields', sa.JSON(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('part_bytes', sa.Integer(), nullable=False),
    sa.Column('part_count', sa.Integer(), nullable=False),
    sa.Column('storage_prefix', sa.String(length=512), nullable=False),
    sa.Column('result_id', sa.String(length=40), nullable=True),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('created_at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_upload_sessions'))
    )
    with op.batch_alter_table('upload_sessions', schema=None) as batch_op:
        batch_op.create_index('ix_upload_sessions_tenant_status', ['tenant_id', 'status'], unique=False)
        batch_op.create_index('ix_upload_sessions_status_expires', ['status', 'expires_at'], unique=False)
    op.create_table('upload_parts',
    sa.Column('session_id', sa.String(length=40), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('received_at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['session_id'], ['upload_sessions.id'], name=op.f('fk_upload_parts_session_id_upload_sessions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('session_id', 'number', name=op.f('pk_upload_parts'))
    )


def downgrade() -> None:
    op.drop_table('upload_parts')
    with op.batch_alter_table('upload_sessions', schema=None) as batch_op:
        batch_op.drop_index('ix_upload_sessions_status_expires')
        batch_op.drop_index('ix_upload_sessions_tenant_status')
    op.drop_table('upload_sessions')
