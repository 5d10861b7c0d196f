"""Verified sources and refreshes: what a repository's registration asks of its source
(add-repo --require-commit, --depth, --refresh), whether its clone fell back to a full one, and
how its last refresh ended.

Every column is of the projection, which artifactfs/schema.py folds anew from the log after the
migration: repositories registered before have none of these options, and a clone of theirs that
fell back is not known (no event of theirs said so).
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("repos") as batch:
        batch.add_column(sa.Column("filter_fallback", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("require_commit", sa.String))
        batch.add_column(sa.Column("depth", sa.Integer))
        batch.add_column(sa.Column("refresh_seconds", sa.Float))
        batch.add_column(sa.Column("refreshed_at", Time))
        batch.add_column(sa.Column("refresh_outcome", sa.String))
