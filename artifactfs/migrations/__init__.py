"""The registry's Alembic migrations (env.py, versions/); run by artifactfs/schema.py."""
