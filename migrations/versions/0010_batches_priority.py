"""The database is the queue: a job's batches are planned as rows and a dispatcher keeps only a
window of them in the broker; jobs carry a priority, API keys the highest they may ask for.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.String(16), nullable=False,
                                   server_default="normal"))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("max_priority", sa.String(16), nullable=False,
                                   server_default="interactive"))
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("item_ids", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE",
                                name="fk_batches_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
    )
    op.create_index("ix_batches_job_id", "batches", ["job_id"])
    op.create_index("ix_batches_state", "batches", ["state"])


def downgrade() -> None:
    op.drop_index("ix_batches_state", table_name="batches")
    op.drop_index("ix_batches_job_id", table_name="batches")
    op.drop_table("batches")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("max_priority")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
