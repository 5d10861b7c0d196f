"""Ready in one commit's time: whether a ready repository's history is all here, when it was
published ready, and how long the rest of its history took (artifactfs/history.py).

Columns of the projection, folded anew from the log after the migration: a repository prepared
before has no READY event that says its history is pending, so it is complete.
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("repos") as batch:
        batch.add_column(sa.Column("history", sa.String, nullable=False, server_default="complete"))
        batch.add_column(sa.Column("ready_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("history_seconds", sa.Float))
