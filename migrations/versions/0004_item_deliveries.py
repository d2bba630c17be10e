"""Item deliveries: the poison guard's count of deliveries within the current job, kept apart from
``attempts`` (every try the item has had, which the nightly reprocessing policy reads).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("deliveries", sa.Integer(), nullable=False,
                                   server_default="0"))
    with op.batch_alter_table("items") as batch:
        batch.alter_column("deliveries", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("deliveries")
