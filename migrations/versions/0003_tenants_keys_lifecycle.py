"""Tenants and API keys; job ownership, idempotency keys and callbacks; item attempts;
reprocess membership, leases and webhook deliveries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("webhook_secret", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_api_keys_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("api_key_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("callback_url", sa.String(2048), nullable=True))
        batch.create_foreign_key("fk_jobs_tenant_id_tenants", "tenants", ["tenant_id"], ["id"])
        batch.create_foreign_key("fk_jobs_api_key_id_api_keys", "api_keys", ["api_key_id"], ["id"],
                                 ondelete="SET NULL")
        batch.create_unique_constraint("uq_jobs_tenant_id", ["tenant_id", "idempotency_key"])
        batch.create_index("ix_jobs_tenant_id", ["tenant_id"])
        batch.create_index("ix_jobs_tenant_id_created_at", ["tenant_id", "created_at"])
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False,
                                   server_default="0"))
    with op.batch_alter_table("items") as batch:
        batch.alter_column("attempts", server_default=None)
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_model_versions_tenant_id_tenants", "tenants", ["tenant_id"],
                                 ["id"])
        batch.drop_constraint("uq_model_versions_name", type_="unique")
        batch.create_unique_constraint("uq_model_versions_tenant_id",
                                       ["tenant_id", "name", "version"])
        batch.create_index("ix_model_versions_tenant_id", ["tenant_id"])
    op.create_table(
        "job_members",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_members_job_id_jobs",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name="fk_job_members_item_id_items",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "item_id", name="pk_job_members"),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("delivered_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_webhook_deliveries_job_id_jobs",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
        sa.UniqueConstraint("job_id", "event", name="uq_webhook_deliveries_job_id"),
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("leases")
    op.drop_table("job_members")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_index("ix_model_versions_tenant_id")
        batch.drop_constraint("uq_model_versions_tenant_id", type_="unique")
        batch.create_unique_constraint("uq_model_versions_name", ["name", "version"])
        batch.drop_constraint("fk_model_versions_tenant_id_tenants", type_="foreignkey")
        batch.drop_column("tenant_id")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("attempts")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_tenant_id_created_at")
        batch.drop_index("ix_jobs_tenant_id")
        batch.drop_constraint("uq_jobs_tenant_id", type_="unique")
        batch.drop_constraint("fk_jobs_api_key_id_api_keys", type_="foreignkey")
        batch.drop_constraint("fk_jobs_tenant_id_tenants", type_="foreignkey")
        batch.drop_column("callback_url")
        batch.drop_column("idempotency_key")
        batch.drop_column("api_key_id")
        batch.drop_column("tenant_id")
    op.drop_table("api_keys")
    op.drop_table("tenants")
