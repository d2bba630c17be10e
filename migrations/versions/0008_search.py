"""Search: model versions get a kind (classifier or aligner, defaults per tenant and kind), and
the vector indexes of (tenant, aligner) with the segments batches append to them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False,
                                   server_default="classifier"))
    op.create_table(
        "search_indexes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("base_blob", sa.String(64), nullable=True),
        sa.Column("base_rows", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"],
                                name="fk_search_indexes_tenant_id_tenants"),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"], ondelete="CASCADE",
                                name="fk_search_indexes_model_version_id_model_versions"),
        sa.PrimaryKeyConstraint("id", name="pk_search_indexes"),
        sa.UniqueConstraint("model_version_id", name="uq_search_indexes_model_version_id"),
    )
    op.create_index("ix_search_indexes_tenant_id", "search_indexes", ["tenant_id"])
    op.create_table(
        "index_segments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("index_id", sa.Integer(), nullable=False),
        sa.Column("blob", sa.String(64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("merged", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["index_id"], ["search_indexes.id"], ondelete="CASCADE",
                                name="fk_index_segments_index_id_search_indexes"),
        sa.PrimaryKeyConstraint("id", name="pk_index_segments"),
        sa.UniqueConstraint("index_id", "blob", name="uq_index_segments_index_id"),
    )
    op.create_index("ix_index_segments_index_id_merged", "index_segments",
                    ["index_id", "merged"])


def downgrade() -> None:
    op.drop_index("ix_index_segments_index_id_merged", table_name="index_segments")
    op.drop_table("index_segments")
    op.drop_index("ix_search_indexes_tenant_id", table_name="search_indexes")
    op.drop_table("search_indexes")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("kind")
