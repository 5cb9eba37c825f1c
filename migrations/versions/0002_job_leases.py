"""Job leases: the lease columns on jobs, the lease history, and the workers' table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 02:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite alters a table by copying it.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_epoch", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("takeovers", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "job_leases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_leases_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_leases")),
        sa.UniqueConstraint("job_id", "epoch", name=op.f("uq_job_leases_job_id_epoch")),
    )
    op.create_index(op.f("ix_job_leases_job_id"), "job_leases", ["job_id"], unique=False)
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("gpu", sa.Boolean(), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index(op.f("ix_job_leases_job_id"), table_name="job_leases")
    op.drop_table("job_leases")
    with op.batch_alter_table("jobs") as batch:
        for column in ("enqueued_at", "takeovers", "lease_expires_at", "lease_owner", "lease_epoch"):
            batch.drop_column(column)
