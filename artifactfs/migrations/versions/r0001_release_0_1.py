"""The registry of release 0.1.0: the event log and the projection of one host.

Release 0.1.0 created these tables itself, before there were migrations: a registry it made has
them and no alembic_version, and this revision takes it as it is.
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    if "events" in sa.inspect(op.get_bind()).get_table_names():
        return  # made by release 0.1.0
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("stream", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("type", sa.String, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("job_id", sa.String),
        sa.Column("dedupe_key", sa.String),
        sa.UniqueConstraint("stream", "version", name="uq_events_stream_version"),
        sa.UniqueConstraint("dedupe_key", name="uq_events_dedupe_key"),
    )
    op.create_index("ix_events_stream", "events", ["stream"])
    op.create_index("ix_events_job_id", "events", ["job_id"])
    op.create_table(
        "repos",
        sa.Column("name", sa.String, primary_key=True),
        *repo_columns(),
    )


def repo_columns() -> list[sa.Column]:
    """The projection's columns after its key, as of this revision."""
    return [
        sa.Column("remote_url", sa.String, nullable=False),
        sa.Column("ref", sa.String, nullable=False),
        sa.Column("mount_path", sa.String, nullable=False),
        sa.Column("git_dir", sa.String, nullable=False),
        sa.Column("fetch_ref", sa.String),
        sa.Column("prepared_gitdir", sa.Boolean, nullable=False),
        sa.Column("asynchronous", sa.Boolean, nullable=False),
        sa.Column("prepare_state", sa.String, nullable=False),
        sa.Column("prepare_phase", sa.String),
        sa.Column("prepare_error", sa.String),
        sa.Column("prepare_attempt", sa.Integer, nullable=False),
        sa.Column("attempt_started_at", Time),
        sa.Column("attempt_version", sa.Integer, nullable=False),
        sa.Column("head", sa.String),
        sa.Column("owner_uid", sa.Integer),
        sa.Column("owner_gid", sa.Integer),
        sa.Column("blob_filter", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("registered_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
    ]
