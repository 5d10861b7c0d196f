"""The filesystem of one mounted repository, one concern per module:

- operations.py: TreeFS, one method per kernel operation (pyfuse3's style);
- nodes.py: the shared types (kinds of entries, the commit shown, nodes, handles);
- gate.py: the readiness gate every user-facing operation passes;
- hydrator.py: blobs fetched in batches, one transaction for many objects;
- faults.py: an unexpected exception costs one operation EIO, never the session.
"""
