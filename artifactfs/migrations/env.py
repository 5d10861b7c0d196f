"""Alembic's entry point for the registry's migrations. artifactfs/schema.py runs them on a
connection it has already opened, inside its transaction and under its lock, so that a migration
and the projection's rebuild after it commit together, or not at all."""
from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():  # joins the transaction the connection is already in
    context.run_migrations()
