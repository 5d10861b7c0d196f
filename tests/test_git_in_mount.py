"""git inside the mount gives what it gives in a plain clone of the same remote: each step runs in
both, and status, diff, the resulting trees, refs and files are compared after it."""
from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Artifactfs, new_installation, wait_until
from .gitremote import GitDaemon, SampleRepo, add_commit, make_sample_repo
from .test_mount import present_blobs

# Fixed identities and dates: the same commit made in both places has the same id.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Sandbox", "GIT_AUTHOR_EMAIL": "sandbox@example.com", "GIT_AUTHOR_DATE": "1700000000 +0000",
    "GIT_COMMITTER_NAME": "Sandbox", "GIT_COMMITTER_EMAIL": "sandbox@example.com",
    "GIT_COMMITTER_DATE": "1700000000 +0000",
}  # fmt: skip


def run_git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # core.editor: a rebase or cherry-pick that goes on after a conflict keeps its message.
    return subprocess.run(["git", "-c", "core.editor=true", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV})  # fmt: skip


def git(cwd: Path, *args: str, check: bool = True) -> str:
    proc = run_git(cwd, *args)
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} in {cwd} failed: {proc.stderr}")
    return proc.stdout


def tree_of(root: Path) -> dict[str, tuple[str, bytes]]:
    """Every path of a work tree (without .git): its kind and content (a link's target)."""
    found: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            filenames = [f for f in filenames if f != ".git"]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(rel_dir / name)
            mode = path.lstat().st_mode
            if name == ".git":  # a worktree's link to its git directory: a path of its own
                found[rel] = ("gitfile", b"")
            elif stat.S_ISLNK(mode):
                found[rel] = ("link", os.readlink(path).encode())
            elif stat.S_ISDIR(mode):
                found[rel] = ("dir", b"")
            else:
                found[rel] = ("exec" if mode & stat.S_IXUSR else "file", path.read_bytes())
    return found


class Both:
    """A mount and a plain clone of one remote, driven step by step."""

    def __init__(self, mnt: Path, plain: Path) -> None:
        self.mnt, self.plain = mnt, plain

    def do(self, action: Callable[[Path], object]) -> None:
        for root in (self.plain, self.mnt):
            action(root)

    def git(self, *args: str) -> None:
        outputs = [git(root, *args) for root in (self.plain, self.mnt)]
        assert outputs[0] == outputs[1], f"git {' '.join(args)}: {outputs}"

    def fails(self, *args: str, says: str) -> None:
        """A git command that must fail, the same way in both (a conflict, a refused fast-forward)."""
        procs = [run_git(root, *args) for root in (self.plain, self.mnt)]
        codes = [p.returncode for p in procs]
        assert codes[0] == codes[1] != 0, f"git {' '.join(args)}: {codes} {[p.stderr for p in procs]}"
        assert procs[0].stdout == procs[1].stdout, f"git {' '.join(args)}: {[p.stdout for p in procs]}"
        assert all(says in p.stdout + p.stderr for p in procs), [p.stdout + p.stderr for p in procs]

    def same(self, what: str) -> None:
        for args in (("status", "--porcelain=v1", "--untracked-files=all"), ("diff",), ("diff", "--cached"),
                     ("rev-parse", "HEAD", "HEAD^{tree}"), ("branch", "--list", "--format=%(refname) %(objectname)"),
                     ("stash", "list", "--format=%gs")):  # fmt: skip
            assert git(self.mnt, *args) == git(self.plain, *args), f"after {what}: git {' '.join(args)}"
        assert tree_of(self.mnt) == tree_of(self.plain), f"after {what}: the work trees differ"


@pytest.fixture
def both(tmp_path: Path, git_daemon: GitDaemon) -> Iterator[tuple[Both, Artifactfs, SampleRepo]]:
    sample = make_sample_repo(git_daemon.base, "both")
    afs = new_installation(tmp_path / "afs")
    try:
        afs.add("both", git_daemon.url("both.git"))
        afs.start_daemon()
        mnt = afs.wait_mounted("both")
        plain = tmp_path / "plain"
        subprocess.run(["git", "clone", "-q", "--no-tags", "--single-branch", "--branch", "main", git_daemon.url("both.git"),
                        str(plain)], check=True, capture_output=True)  # fmt: skip
        subprocess.run(["git", "-C", str(plain), "submodule", "deinit", "--all", "-q"], capture_output=True)
        yield Both(mnt, plain), afs, sample
    finally:
        afs.cleanup()


def edit(root: Path) -> None:
    with open(root / "src/app.py", "ab") as fh:
        fh.write(b"# edited\n")
    (root / "new.txt").write_bytes(b"new\n")
    (root / "empty.txt").unlink()
    os.chmod(root / "README.md", 0o755)
    (root / "pkg/deep").mkdir(parents=True)
    (root / "pkg/deep/mod.py").write_bytes(b"VALUE = 1\n")
    (root / "bin").rename(root / "tools")


def test_status_diff_add_commit_match_a_plain_clone(both: tuple[Both, Artifactfs, SampleRepo]) -> None:
    pair, _, _ = both
    pair.same("mounting")
    pair.do(edit)
    pair.same("editing")
    pair.git("add", "-A")
    pair.same("git add -A")
    pair.git("commit", "-q", "-m", "Edit in the sandbox")
    pair.same("git commit")
    pair.do(lambda root: (root / "src/app.py").write_bytes(b"print('again')\n"))
    pair.git("commit", "-q", "-a", "-m", "Again")
    pair.same("git commit -a")
    pair.git("log", "--format=%H %s", "--stat")
    pair.git("show", "HEAD~1", "--format=%H")
    pair.git("blame", "--porcelain", "src/app.py")


def test_branches_checkout_reset_stash_and_clean_match_a_plain_clone(both: tuple[Both, Artifactfs, SampleRepo]) -> None:
    pair, _, _ = both
    pair.git("switch", "-q", "-c", "topic")
    pair.do(edit)
    pair.git("add", "-A")
    pair.git("commit", "-q", "-m", "On topic")
    pair.same("a commit on a branch")
    pair.git("checkout", "-q", "main")
    pair.same("git checkout main")
    pair.git("checkout", "-q", "HEAD~1", "--", "README.md")
    pair.same("git checkout of one file")
    pair.git("reset", "-q", "--hard")
    pair.same("git reset --hard")
    pair.do(lambda root: (root / "README.md").write_bytes(b"stash me\n"))
    pair.do(lambda root: (root / "untracked.txt").write_bytes(b"and me\n"))
    pair.git("stash", "push", "-q", "--include-untracked")
    pair.same("git stash -u")
    pair.git("stash", "pop", "-q")
    pair.same("git stash pop")
    pair.git("reset", "-q", "--hard", "HEAD~1")
    pair.same("git reset --hard HEAD~1")
    pair.do(lambda root: (root / "scratch/sub").mkdir(parents=True))
    pair.do(lambda root: (root / "scratch/sub/x.o").write_bytes(b"\0"))
    pair.git("clean", "-q", "-fd")
    pair.same("git clean -fd")
    pair.git("merge", "-q", "--no-edit", "topic")
    pair.same("git merge")
    pair.git("switch", "-q", "topic")
    pair.same("git switch")


def test_status_and_diff_of_an_untouched_mount_fetch_nothing(both: tuple[Both, Artifactfs, SampleRepo]) -> None:
    pair, afs, _ = both
    git_dir = afs.root / "git" / "both.git"
    before = present_blobs(git_dir)  # what preparation fetched: what status reads (.gitmodules)
    for _ in range(2):
        assert git(pair.mnt, "status", "--porcelain") == ""
        assert git(pair.mnt, "diff") == ""
    assert present_blobs(git_dir) == before


def test_editing_one_file_hydrates_that_blob_only(both: tuple[Both, Artifactfs, SampleRepo]) -> None:
    pair, afs, sample = both
    git_dir = afs.root / "git" / "both.git"
    before = present_blobs(git_dir)
    with open(pair.mnt / "src/lib/util.py", "ab") as fh:
        fh.write(b"# one edit\n")
    edited = before | {sample.blob_id("src/lib/util.py")}
    assert present_blobs(git_dir) == edited
    assert git(pair.mnt, "status", "--porcelain") == " M src/lib/util.py\n"
    assert git(pair.mnt, "diff", "--stat") == " src/lib/util.py | 1 +\n 1 file changed, 1 insertion(+)\n"
    assert present_blobs(git_dir) == edited


def directories_opened(root: Path, *args: str) -> tuple[str, int]:
    """git's output, and how many directories it opened looking for untracked files (trace2)."""
    trace = root.parent / f"trace-{os.getpid()}-{len(args)}.json"
    trace.unlink(missing_ok=True)
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV, "GIT_TRACE2_EVENT": str(trace), "GIT_TRACE2_EVENT_NESTING": "10"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    opened = [int(event["value"]) for event in map(json.loads, trace.read_text().splitlines())
              if event.get("event") == "data" and event.get("key") == "opendir"]  # fmt: skip
    trace.unlink()
    return proc.stdout, sum(opened)


def test_the_first_status_walks_no_directory_and_still_sees_new_files(both: tuple[Both, Artifactfs, SampleRepo]) -> None:
    """Preparation writes the untracked cache of a tree with no untracked file: the first status
    opens no directory, and files made later are found all the same."""
    pair, _, _ = both
    status, opened = directories_opened(pair.mnt, "status", "--porcelain")
    assert status == "" and opened == 0
    for root in (pair.plain, pair.mnt):
        (root / "src/lib/new.py").write_bytes(b"NEW = 1\n")
        (root / "fresh/deeper").mkdir(parents=True)
        (root / "fresh/deeper/x.txt").write_bytes(b"x\n")
        (root / "build.o").write_bytes(b"\0")  # ignored by the sample's .gitignore, or not: as in the clone
    status, opened = directories_opened(pair.mnt, "status", "--porcelain")
    assert status == git(pair.plain, "status", "--porcelain") and "?? src/lib/new.py" in status
    assert 0 < opened < 10  # the directories the hook named, not every one
    pair.same("new files after the first status")


def test_a_refresh_keeps_untracked_files_in_sight(tmp_path: Path, git_daemon: GitDaemon) -> None:
    """A new preparation writes a fresh untracked cache that knows of no untracked file; the hook
    names what the overlay holds, so git looks there again."""
    sample = make_sample_repo(git_daemon.base, "refreshed")
    afs = new_installation(tmp_path / "afs")
    try:
        afs.up()
        afs.add("refreshed", git_daemon.url("refreshed.git"))
        mnt = afs.wait_mounted("refreshed")
        (mnt / "src/lib/mine.py").write_bytes(b"MINE = 1\n")
        (mnt / "scratch").mkdir()
        (mnt / "scratch/notes.txt").write_bytes(b"notes\n")
        assert git(mnt, "status", "--porcelain") == "?? scratch/\n?? src/lib/mine.py\n"
        newer = add_commit(sample, {"NEWS": b"news\n"}, "News")
        afs.run("prepare", "--name", "refreshed")
        wait_until(lambda: afs.describe_mount("refreshed")["head"] == newer, 60, interval=0.1, what="the refresh")
        assert (mnt / "NEWS").read_bytes() == b"news\n"
        assert git(mnt, "status", "--porcelain") == "?? scratch/\n?? src/lib/mine.py\n"
    finally:
        afs.cleanup()


def test_a_checkout_of_another_commit_fetches_in_one_transaction(both: tuple[Both, Artifactfs, SampleRepo],
                                                                git_daemon: GitDaemon) -> None:  # fmt: skip
    pair, _, sample = both
    changed = {f"src/gen/module{n:02d}.py": b"N = %d\n" % n for n in range(20)}
    add_commit(sample, {**changed, "README.md": b"other readme\n"}, "Twenty-one files", branch="other")
    pair.git("fetch", "-q", "origin", "other:other")  # trees and commits only: blobless
    before = git_daemon.fetch_count("both.git")
    pair.git("checkout", "-q", "other")
    fetched = git_daemon.fetch_count("both.git") - before
    pair.same("git checkout of another commit")
    # The plain clone has every blob; the mount's git asks for the 21 it writes, then for every
    # other blob of the index it does not have: the helper fetches both in one transaction.
    assert fetched == 1


def test_a_checkout_of_paths_fetches_those_paths_alone(both: tuple[Both, Artifactfs, SampleRepo],
                                                       git_daemon: GitDaemon) -> None:  # fmt: skip
    """Unlike a checkout of a commit, it leaves the cache of trees alone: the rest of the tree
    stays where it is, on the remote."""
    pair, _, sample = both
    add_commit(sample, {"src/gen/module00.py": b"N = 0\n", "README.md": b"other readme\n"}, "Two files", branch="other")
    pair.git("fetch", "-q", "origin", "other:other")
    git_dir = Path(git(pair.mnt, "rev-parse", "--absolute-git-dir").strip())
    present = present_blobs(git_dir)
    before = git_daemon.fetch_count("both.git")
    pair.git("checkout", "-q", "other", "--", "src/gen/module00.py")
    pair.git("checkout", "-q", "other", "README.md")
    # A transaction per version: git's for the two it writes, and the mount's if it reads the old one.
    assert git_daemon.fetch_count("both.git") - before <= 3
    versions = set(git(pair.plain, "rev-parse", "other:src/gen/module00.py", "other:README.md", "main:README.md").split())
    assert present_blobs(git_dir) - present <= versions  # the versions of those paths, nothing else
    pair.same("git checkout of paths from another commit")  # (which reads every file)


# --- history rewritten, commits brought in, sent out, worked on elsewhere ---

APP = "src/app.py"  # nine lines: a change to the first and one after the last merge cleanly
UTIL = "src/lib/util.py"
STATUS = ("status", "--porcelain=v1", "--untracked-files=all")


def commit(files: dict[str, bytes | None], message: str, *, mode: dict[str, int] | None = None) -> Callable[[Path], None]:
    """A step that writes (None: removes) files, changes modes, and commits all of it."""

    def step(root: Path) -> None:
        for rel, content in files.items():
            path = root / rel
            if content is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
        for rel, bits in (mode or {}).items():
            os.chmod(root / rel, bits)
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", message)

    return step


def first_line_changed(content: bytes, line: bytes) -> bytes:
    return line + b"\n" + content.split(b"\n", 1)[1]


def test_rebase_onto_a_moved_main_matches_a_plain_clone(both: tuple[Both, Artifactfs, SampleRepo]) -> None:
    pair, _, sample = both
    pair.git("switch", "-q", "-c", "topic")
    pair.do(commit({"topic.txt": b"one\n", UTIL: sample.files[UTIL] + b"# topic\n"}, "Topic one"))
    pair.do(commit({"topic.txt": b"one\ntwo\n", "empty.txt": None}, "Topic two", mode={"bin/run.sh": 0o644}))
    pair.git("switch", "-q", "main")
    pair.do(commit({"docs/main.txt": b"main moved\n", "README.md": b"# main moved\n"}, "Main moves"))
    pair.git("switch", "-q", "topic")
    pair.same("going back to the branch")
    pair.git("rebase", "-q", "main")
    pair.same("git rebase main")
    pair.git("log", "--format=%H %P %s", "--name-status", "main^..topic")


def test_a_rebase_that_rewrites_files_of_the_work_tree_matches_a_plain_clone(
    both: tuple[Both, Artifactfs, SampleRepo],
) -> None:
    pair, _, sample = both
    app, util, readme = sample.files[APP], sample.files[UTIL], sample.files["README.md"]
    pair.git("switch", "-q", "-c", "topic")
    pair.do(commit({APP: app + b"# topic\n", "README.md": readme + b"topic\n"}, "Topic appends"))
    pair.do(commit({UTIL: util.replace(b"hello", b"hi")}, "Topic greets"))
    pair.git("switch", "-q", "main")
    # The same files changed on main: the rebase merges both into each (and util.py conflicts).
    pair.do(commit({APP: first_line_changed(app, b"from lib import util  # main"),
                    "README.md": first_line_changed(readme, b"# main"),
                    UTIL: util.replace(b"hello", b"hello there")}, "Main changes the same files"))  # fmt: skip
    pair.git("switch", "-q", "topic")
    pair.do(lambda root: (root / "src/lib/data.json").write_bytes(b"{}\n"))  # not committed: stashed meanwhile
    pair.fails("rebase", "--autostash", "main", says=f"CONFLICT (content): Merge conflict in {UTIL}")
    pair.same("a rebase stopped by a conflict")
    pair.do(lambda root: (root / UTIL).write_bytes(util.replace(b"hello", b"hi there")))
    pair.git("add", UTIL)
    pair.git("rebase", "--continue")
    pair.same("git rebase --continue")
    assert (pair.mnt / APP).read_bytes() == first_line_changed(app, b"from lib import util  # main") + b"# topic\n"
    assert (pair.mnt / "src/lib/data.json").read_bytes() == b"{}\n"


def test_cherry_pick_matches_a_plain_clone(both: tuple[Both, Artifactfs, SampleRepo]) -> None:
    pair, _, sample = both
    readme = sample.files["README.md"]
    pair.git("switch", "-q", "-c", "topic")
    pair.do(commit({"picked/one.txt": b"one\n", UTIL: sample.files[UTIL] + b"# one\n"}, "One"))
    pair.do(commit({APP: sample.files[APP] + b"# two\n", "empty.txt": None}, "Two", mode={"README.md": 0o755}))
    pair.do(commit({"README.md": first_line_changed(readme, b"# three")}, "Three"))
    pair.git("switch", "-q", "main")
    pair.do(commit({"README.md": first_line_changed(readme, b"# main")}, "Main"))
    pair.git("cherry-pick", "topic~2")
    pair.same("git cherry-pick")
    pair.git("cherry-pick", "--no-commit", "topic~1")
    pair.same("git cherry-pick --no-commit")
    pair.git("commit", "-q", "-m", "Two, picked")
    pair.same("committing what was picked")
    pair.fails("cherry-pick", "topic", says="CONFLICT (content): Merge conflict in README.md")
    pair.same("a cherry-pick stopped by a conflict")
    pair.git("cherry-pick", "--abort")
    pair.same("git cherry-pick --abort")
    assert (pair.mnt / "README.md").read_bytes() == first_line_changed(readme, b"# main")


def test_pull_ff_only_matches_a_plain_clone(both: tuple[Both, Artifactfs, SampleRepo], tmp_path: Path) -> None:
    pair, _, sample = both
    # The remote gains commits after both were cloned, pushed from a third clone.
    third = tmp_path / "third"
    git(tmp_path, "clone", "-q", sample.url, str(third))
    commit({APP: sample.files[APP] + b"# upstream\n", "new/dir/file.txt": b"upstream\n", "empty.txt": None},
           "Upstream one", mode={"README.md": 0o755})(third)  # fmt: skip
    commit({"new/dir/file.txt": b"upstream, again\n"}, "Upstream two")(third)
    git(third, "push", "-q", "origin", "main")
    pair.do(lambda root: (root / "src/lib/data.json").write_bytes(b"{}\n"))  # a local change the pull keeps
    pair.git("pull", "-q", "--ff-only")
    pair.same("git pull --ff-only")
    pair.git("rev-parse", "origin/main")
    assert git(pair.mnt, "rev-parse", "HEAD").strip() == git(third, "rev-parse", "HEAD").strip()
    # Diverged: local and remote commits each. A fast-forward only pull refuses and changes nothing.
    pair.git("commit", "-q", "-a", "-m", "Local")
    commit({"new/dir/file.txt": b"upstream, third\n"}, "Upstream three")(third)
    git(third, "push", "-q", "origin", "main")
    pair.fails("pull", "-q", "--ff-only", says="Not possible to fast-forward")
    pair.same("a refused git pull --ff-only")
    pair.git("rev-parse", "origin/main")


def remote_ref(bare: Path, ref: str) -> str:
    return git(bare, "rev-parse", "--verify", ref).strip()


def test_push_from_the_mount_reaches_the_remote(both: tuple[Both, Artifactfs, SampleRepo]) -> None:
    pair, _, sample = both
    git(sample.bare, "config", "daemon.receivepack", "true")  # git daemon takes pushes to this repository
    pair.do(edit)
    pair.git("add", "-A")
    pair.git("commit", "-q", "-m", "Made in the sandbox")
    pair.same("a commit to push")
    expected = git(pair.plain, "rev-parse", "HEAD").strip()
    git(pair.mnt, "push", "-q", "origin", "HEAD:refs/heads/sandbox")  # a new branch
    assert remote_ref(sample.bare, "refs/heads/sandbox") == expected
    # Everything the commit needs arrived: the remote has all of its objects, and its tree.
    git(sample.bare, "fsck", "--connectivity-only", "--no-dangling")
    assert git(sample.bare, "ls-tree", "-r", "sandbox") == git(pair.plain, "ls-tree", "-r", "HEAD")
    git(pair.mnt, "push", "-q", "origin", "main")  # the branch the remote serves, fast-forward
    assert remote_ref(sample.bare, "refs/heads/main") == expected
    git(pair.plain, "fetch", "-q")  # the plain clone learns of it; the mount knows from its push
    pair.git("status", "--porcelain=v2", "--branch")
    pair.git("rev-parse", "origin/main")
    pair.same("git push")


def worktrees(root: Path, *paths: Path) -> list[str]:
    """`git worktree list --porcelain`, each linked worktree's path named by its place in `paths`.

    The main worktree's path is left out: git names it after the common git directory, without
    its "/.git", so for a mount it names the clone's git directory (git/<name>.git), not the mount.
    """
    main, *linked = git(root, "worktree", "list", "--porcelain").strip().split("\n\n")
    assert main.startswith("worktree "), main
    for index, path in enumerate(paths):
        linked = [block.replace(f"worktree {path}\n", f"worktree <{index}>\n") for block in linked]
    return [main.split("\n", 1)[1], *linked]


def test_worktrees_outside_and_inside_the_mount_match_a_plain_clone(
    both: tuple[Both, Artifactfs, SampleRepo], tmp_path: Path
) -> None:
    pair, _, _ = both
    outside = {pair.plain: tmp_path / "wt-of-plain", pair.mnt: tmp_path / "wt-of-mount"}
    pair.do(lambda root: git(root, "worktree", "add", "-q", "-b", "elsewhere", str(outside[root]), "HEAD~1"))
    assert tree_of(outside[pair.mnt]) == tree_of(outside[pair.plain])
    assert worktrees(pair.mnt, outside[pair.mnt]) == worktrees(pair.plain, outside[pair.plain])
    pair.do(lambda root: (outside[root] / "README.md").write_bytes(b"changed outside\n"))
    pair.do(lambda root: (outside[root] / "elsewhere.txt").write_bytes(b"made outside\n"))
    assert git(outside[pair.mnt], *STATUS) == git(outside[pair.plain], *STATUS) == " M README.md\n?? elsewhere.txt\n"
    pair.do(lambda root: commit({}, "Outside")(outside[root]))
    assert tree_of(outside[pair.mnt]) == tree_of(outside[pair.plain])
    assert git(outside[pair.mnt], *STATUS) == git(outside[pair.plain], *STATUS) == ""
    pair.same("a commit in a worktree outside")
    # Inside: a second work tree in the mount itself (its files in the overlay, its git data beside).
    pair.git("branch", "inner", "elsewhere")
    pair.git("worktree", "add", "-q", "wt2", "inner")
    pair.same("git worktree add wt2")
    inside = {root: root / "wt2" for root in (pair.plain, pair.mnt)}
    for args in (STATUS, ("rev-parse", "HEAD", "HEAD^{tree}")):
        assert git(inside[pair.mnt], *args) == git(inside[pair.plain], *args), args
    pair.do(lambda root: (inside[root] / "src/lib/util.py").write_bytes(b"# changed in wt2\n"))
    pair.do(lambda root: (inside[root] / "scratch.txt").write_bytes(b"untracked in wt2\n"))
    for args in (STATUS, ("diff",)):
        assert git(inside[pair.mnt], *args) == git(inside[pair.plain], *args), args
    assert git(inside[pair.mnt], *STATUS) == " M src/lib/util.py\n?? scratch.txt\n"
    pair.do(lambda root: commit({}, "Inside")(inside[root]))
    pair.same("a commit in wt2")
    assert git(inside[pair.mnt], *STATUS) == git(inside[pair.plain], *STATUS) == ""
    pair.git("worktree", "remove", "wt2")
    pair.same("git worktree remove wt2")
    assert worktrees(pair.mnt, outside[pair.mnt]) == worktrees(pair.plain, outside[pair.plain])
