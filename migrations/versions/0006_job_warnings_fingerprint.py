"""Job warnings (what a user should know about a job that did not fail: a model applied to classes
it lacks, features far from its training data), the fingerprint of the request that made a job
(an Idempotency-Key reused for another request is refused), and a result's notes on how its media
were read (a caption's encoding, whether it was cut).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("request_fingerprint", sa.String(64), nullable=True))
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("info", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("info")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_fingerprint")
        batch.drop_column("warnings")
