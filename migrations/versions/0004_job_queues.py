"""Queues: the queue each job was sent to, and the queues each worker consumes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 04:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Jobs from before have no queue: they are routed by their device when next sent.
    op.add_column("jobs", sa.Column("queue", sa.String(length=32), nullable=True))
    op.add_column("workers", sa.Column("queues", sa.String(length=200), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("workers", "queues")
    op.drop_column("jobs", "queue")
