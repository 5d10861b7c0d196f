"""The filesystem of one mounted repository, one concern per module:

- operations.py: TreeFS, one method per kernel operation (pyfuse3's style);
- nodes.py: the shared types (kinds of entries, the commit shown, nodes, handles);
- overlay.py: what was written on top of the commit, durable, every change numbered;
- layers.py: the commit's trees under the overlay, path by path;
- fsmonitor.py: git's fsmonitor protocol, answered from the overlay (hook: fsmonitor_hook.sh);
- gate.py: the readiness gate every user-facing operation passes;
- hydrator.py: blobs fetched in batches, one transaction for many objects;
- faults.py: an unexpected exception costs one operation EIO, never the session.
"""
