# git's fsmonitor hook (version 2) for a work tree in an artifactfs mount.
#
# git runs it from the top of the work tree as `<hook> 2 <token>` and reads, on standard output,
# a new token, NUL, and the paths changed since <token>, each ended by NUL. The mount answers
# (see fsmonitor.py) through an extended attribute of its root, in pages: the first begins with
# the number of pages and a newline. Anywhere else (a worktree outside the mount, an older mount)
# the answer is "/": git then checks every file itself.
#
# It runs for every git command that reads the index: a shell and getfattr cost a few
# milliseconds, where starting any interpreter would cost ten.
PATH=/usr/bin:/bin:$PATH
if [ "$1" != 2 ]; then
    echo "artifactfs fsmonitor hook: only hook version 2 is spoken" >&2
    exit 1
fi
name="user.artifactfs.fsmonitor:$2"
getfattr --only-values -n "$name:0" . 2>/dev/null | {
    if ! IFS= read -r pages; then
        printf 'afs1:none\000/\000'
        exit 0
    fi
    cat
    page=1
    while [ "$page" -lt "$pages" ] 2>/dev/null; do
        getfattr --only-values -n "$name:$page" . 2>/dev/null
        page=$((page + 1))
    done
}
