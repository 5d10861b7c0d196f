"""Hosts: every event and every repository belongs to one host of the fleet.

A stream is a repository name on one host, so versions are unique per (host, stream). What was
there before belongs to the host that runs the migration (ARTIFACTFS_HOST): a registry of 0.1.0
served one host. The projection is recreated with (host, name) as its key; artifactfs/schema.py
folds it anew from the log after the migration.
"""
import sqlalchemy as sa
from alembic import context, op

from artifactfs.migrations.versions.r0001_release_0_1 import repo_columns

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    host = context.config.attributes["host"]
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("host", sa.String, nullable=False, server_default=host))
        batch.drop_constraint("uq_events_stream_version", type_="unique")
        batch.create_unique_constraint("uq_events_host_stream_version", ["host", "stream", "version"])
    with op.batch_alter_table("events") as batch:
        batch.alter_column("host", server_default=None)  # from now on every append names its host
    op.drop_table("repos")
    op.create_table(
        "repos",
        sa.Column("host", sa.String, primary_key=True),
        sa.Column("name", sa.String, primary_key=True),
        *repo_columns(),
    )
