"""One module a revision, applied in order by artifactfs/schema.py."""
