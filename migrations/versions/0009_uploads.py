"""Resumable uploads (tus): an archive arriving in pieces, made into a job once whole; and a
job's archive size as a 64-bit integer (archives of 2 GiB and more overflowed it on PostgreSQL).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # On SQLite this rebuilds the table (migrations/env.py runs with foreign keys off, so the
    # rebuild's drop does not cascade to the job's items).
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("archive_bytes", type_=sa.BigInteger(), existing_type=sa.Integer(),
                           existing_nullable=False)
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archive_blob", sa.String(64), nullable=True),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE",
                                name="fk_uploads_tenant_id_tenants"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], ondelete="SET NULL",
                                name="fk_uploads_api_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_uploads"),
    )
    op.create_index("ix_uploads_tenant_id", "uploads", ["tenant_id"])
    op.create_index("ix_uploads_expires_at", "uploads", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_uploads_expires_at", table_name="uploads")
    op.drop_index("ix_uploads_tenant_id", table_name="uploads")
    op.drop_table("uploads")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("archive_bytes", type_=sa.Integer(), existing_type=sa.BigInteger(),
                           existing_nullable=False)
