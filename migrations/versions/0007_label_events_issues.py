"""Label events (every correction or acceptance of an item's label, appended, with who, when and
the model version shown) and label issues (the items of a train job whose given label looks wrong
to the model trained on it).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("old_label", sa.String(255), nullable=True),
        sa.Column("new_label", sa.String(255), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], ondelete="CASCADE",
                                name="fk_label_events_item_id_items"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], ondelete="SET NULL",
                                name="fk_label_events_api_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_label_events"),
    )
    op.create_index("ix_label_events_item_id", "label_events", ["item_id"])
    op.create_table(
        "label_issues",
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("given_label", sa.String(255), nullable=False),
        sa.Column("suggested_label", sa.String(255), nullable=False),
        sa.Column("quality", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"], ondelete="CASCADE",
                                name="fk_label_issues_model_version_id_model_versions"),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], ondelete="CASCADE",
                                name="fk_label_issues_item_id_items"),
        sa.PrimaryKeyConstraint("model_version_id", "rank", name="pk_label_issues"),
    )


def downgrade() -> None:
    op.drop_table("label_issues")
    op.drop_index("ix_label_events_item_id", table_name="label_events")
    op.drop_table("label_events")
