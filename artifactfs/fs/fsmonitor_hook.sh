#!/bin/sh
# git's fsmonitor hook (version 2) for a work tree in an artifactfs mount.
#
# git runs it from the top of the work tree as `<hook> 2 <token>` and reads, on standard output,
# a new token, NUL, and the paths changed since <token>, each ended by NUL. The mount answers
# (see fsmonitor.py) in a file of its root that a lookup finds and no listing shows:
# `.artifactfs-fsmonitor:<token>`. Anywhere else (a worktree outside the mount, an older mount)
# the answer is "/": git then checks every file itself.
#
# It runs for every git command that reads the index: a shell and cat cost a few milliseconds,
# where starting any interpreter would cost ten. Executable, it saves git the `sh -c` in front.
PATH=/usr/bin:/bin:$PATH
if [ "$1" != 2 ]; then
    echo "artifactfs fsmonitor hook: only hook version 2 is spoken" >&2
    exit 1
fi
cat "./.artifactfs-fsmonitor:$2" 2>/dev/null || printf 'afs1:none\000/\000'
