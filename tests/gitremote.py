"""Real Git remotes for tests.

Everything here drives the ``git`` command-line tool through ``subprocess``:

* :func:`make_sample_repo` / :func:`make_many_files_repo` build bare
  repositories with known content (regular files, an executable, symlinks, a
  gitlink, odd file names, a binary and a large file, branches and a tag).
* :func:`add_commit` moves a branch of such a repository forward.
* :class:`GitDaemon` serves a directory of bare repositories over ``git://``.
* :class:`GitHttpServer` serves the same over smart HTTP with Basic auth.

Both servers run ``git pack-objects`` through an ``uploadpack.packObjectsHook``
script owned by the server object.  The script writes one log line per pack
that the server sends (one line per fetch transaction: a clone, a ``git fetch``
or one lazy fetch of a partial clone), can hold every pack back for a while
(``set_delay``) and can make every pack fail (``set_broken``).  Git only honours
that hook from protected configuration, so the servers run with
``GIT_CONFIG_GLOBAL`` pointing at a config file they write themselves.

Commits are written with ``git fast-import`` using fixed identities and dates,
so building the same repository twice gives the same commit ids.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable, Mapping, Self

__all__ = [
    "SampleRepo",
    "make_sample_repo",
    "make_many_files_repo",
    "make_deep_tree_repo",
    "make_large_file_repo",
    "make_history_repo",
    "make_long_history_repo",
    "add_commit",
    "file_url",
    "git",
    "git_env",
    "GitDaemon",
    "GitHttpServer",
    "HttpRequestRecord",
    "HungRemote",
    "AUTHOR_NAME",
    "AUTHOR_EMAIL",
    "COMMITTER_NAME",
    "COMMITTER_EMAIL",
    "BASE_TIME",
]

AUTHOR_NAME = "Sample Author"
AUTHOR_EMAIL = "author@example.com"
COMMITTER_NAME = "Sample Committer"
COMMITTER_EMAIL = "committer@example.com"
#: Commit time of the first commit of every built repository (UTC seconds).
BASE_TIME = 1_700_000_000
#: Seconds between consecutive commits written by these helpers.
TIME_STEP = 60

_MODE_FILE = "100644"
_MODE_EXEC = "100755"
_MODE_LINK = "120000"
_MODE_GITLINK = "160000"


# --------------------------------------------------------------------------
# running git
# --------------------------------------------------------------------------


def git_env(extra: Mapping[str, str] | None = None, *, isolate: bool = True) -> dict[str, str]:
    """Environment for running git predictably in tests.

    With ``isolate`` the user's and the system's git configuration are ignored
    (no credential helpers, no identity, no ``url.*.insteadOf``) and git never
    prompts on a terminal.  A fixed author/committer identity and date are set
    so that porcelain commands work without a configured identity.
    """
    env = dict(os.environ)
    for key in list(env):
        # Anything that would point git at another repository or config.
        if key in {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                   "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_CEILING_DIRECTORIES",
                   "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT", "GIT_ASKPASS",
                   "SSH_ASKPASS", "GIT_PROTOCOL", "GIT_TRACE", "GIT_TRACE_PACKET"}:
            del env[key]
        elif key.startswith("GIT_CONFIG_KEY_") or key.startswith("GIT_CONFIG_VALUE_"):
            del env[key]
    if isolate:
        env["GIT_CONFIG_NOSYSTEM"] = "1"
        env["GIT_CONFIG_GLOBAL"] = os.devnull
    env["GIT_TERMINAL_PROMPT"] = "0"
    date = f"@{BASE_TIME} +0000"
    env.update({
        "GIT_AUTHOR_NAME": AUTHOR_NAME,
        "GIT_AUTHOR_EMAIL": AUTHOR_EMAIL,
        "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_NAME": COMMITTER_NAME,
        "GIT_COMMITTER_EMAIL": COMMITTER_EMAIL,
        "GIT_COMMITTER_DATE": date,
        "LC_ALL": "C",
    })
    if extra:
        env.update(extra)
    return env


def git(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None,
        input: bytes | None = None, env: Mapping[str, str] | None = None,
        check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run ``git <args>`` and capture stdout/stderr (as bytes).

    ``env`` defaults to :func:`git_env`.  ``-c init.defaultBranch=main`` and
    ``-c protocol.file.allow=always`` are always passed.  With ``check`` a
    non-zero exit raises :class:`subprocess.CalledProcessError` whose message
    includes git's stderr.
    """
    cmd = ["git", "-c", "init.defaultBranch=main", "-c", "protocol.file.allow=always",
           *[os.fspath(a) for a in args]]
    proc = subprocess.run(cmd, cwd=cwd, input=input, env=dict(env) if env is not None else git_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    if check and proc.returncode != 0:
        raise _GitError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


class _GitError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        err = (self.stderr or b"").decode("utf-8", "replace").strip()
        return f"{super().__str__()}\n{err}"


def _git_out(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> str:
    return git(*args, cwd=cwd).stdout.decode().strip()


# --------------------------------------------------------------------------
# repositories
# --------------------------------------------------------------------------


@dataclass
class SampleRepo:
    """A bare repository built by this module, and what it contains.

    ``files``/``executables``/``symlinks``/``gitlinks`` describe the tree of
    ``head`` (the tip of ``branch``, normally ``main``).  ``files`` holds every
    regular file, executables included.
    """

    bare: Path
    head: str
    files: dict[str, bytes]
    executables: set[str]
    symlinks: dict[str, str]
    gitlinks: dict[str, str]
    branch: str = "main"
    #: branch name -> tip commit sha, for every branch written by the helpers
    branches: dict[str, str] = field(default_factory=dict)
    #: tag name -> sha of the commit the tag points at (``v1`` is annotated)
    tags: dict[str, str] = field(default_factory=dict)
    #: commits of ``branch``, oldest first
    history: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Directory name of the bare repository, e.g. ``sample.git``."""
        return self.bare.name

    @property
    def url(self) -> str:
        return file_url(self.bare)

    def blob_id(self, path: str, rev: str | None = None) -> str:
        """Object id of ``path`` at ``rev`` (default: ``head``)."""
        return _git_out("--git-dir", self.bare, "rev-parse", f"{rev or self.head}:{path}")

    def tree_entries(self, rev: str | None = None) -> dict[str, tuple[str, str, str]]:
        """``path -> (mode, type, oid)`` of every entry of ``rev`` (recursive)."""
        out = git("--git-dir", self.bare, "ls-tree", "-r", "-z", rev or self.head).stdout
        entries: dict[str, tuple[str, str, str]] = {}
        for rec in out.split(b"\0"):
            if not rec:
                continue
            meta, path = rec.split(b"\t", 1)
            mode, typ, oid = meta.decode().split()
            entries[path.decode("utf-8", "surrogateescape")] = (mode, typ, oid)
        return entries


def file_url(bare: Path) -> str:
    """``file://`` URL of a local repository."""
    return "file://" + str(Path(bare).resolve())


class _FastImport:
    """Collects a ``git fast-import`` stream and runs it against a repository."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._mark = 0

    def _next_mark(self) -> str:
        self._mark += 1
        return f":{self._mark}"

    def _data(self, payload: bytes) -> None:
        self.buf += b"data %d\n" % len(payload)
        self.buf += payload
        self.buf += b"\n"

    @staticmethod
    def _path(path: str) -> bytes:
        raw = path.encode("utf-8")
        if b"\n" in raw or raw.startswith(b'"') or b"\\" in raw:
            raw = b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n") + b'"'
        return raw

    def commit(self, ref: str, message: str, when: int, parent: str | None,
               changes: Iterable[tuple[str, str, bytes | str | None]]) -> str:
        """Queue a commit.  ``changes`` items are ``(mode, path, content)``:
        content is bytes for blobs (files and symlink targets), a commit sha
        for gitlinks, or ``None`` (mode ignored) to delete ``path``."""
        mark = self._next_mark()
        self.buf += f"commit {ref}\nmark {mark}\n".encode()
        self.buf += f"author {AUTHOR_NAME} <{AUTHOR_EMAIL}> {when} +0000\n".encode()
        self.buf += f"committer {COMMITTER_NAME} <{COMMITTER_EMAIL}> {when} +0000\n".encode()
        self._data(message.encode())
        if parent:
            self.buf += f"from {parent}\n".encode()
        for mode, path, content in changes:
            if content is None:
                self.buf += b"D " + self._path(path) + b"\n"
            elif mode == _MODE_GITLINK:
                assert isinstance(content, str)
                self.buf += f"M {mode} {content} ".encode() + self._path(path) + b"\n"
            else:
                assert isinstance(content, bytes)
                self.buf += f"M {mode} inline ".encode() + self._path(path) + b"\n"
                self._data(content)
        self.buf += b"\n"
        return mark

    def tag(self, name: str, target: str, message: str, when: int) -> None:
        self.buf += f"tag {name}\nfrom {target}\n".encode()
        self.buf += f"tagger {COMMITTER_NAME} <{COMMITTER_EMAIL}> {when} +0000\n".encode()
        self._data(message.encode())

    def run(self, git_dir: Path) -> dict[str, str]:
        """Feed the stream to ``git fast-import``; return ``mark -> sha``."""
        self.buf += b"done\n"
        with tempfile.TemporaryDirectory(prefix="fastimport-") as tmp:
            marks = Path(tmp) / "marks"
            git("--git-dir", git_dir, "fast-import", "--quiet", "--done",
                f"--export-marks={marks}", input=bytes(self.buf))
            result = {}
            for line in marks.read_text().splitlines():
                mark, sha = line.split()
                result[mark] = sha
        return result


def _init_bare(bare: Path) -> None:
    if bare.exists():
        raise FileExistsError(f"{bare} already exists")
    bare.parent.mkdir(parents=True, exist_ok=True)
    git("init", "--quiet", "--bare", bare)
    git("--git-dir", bare, "symbolic-ref", "HEAD", "refs/heads/main")
    git("--git-dir", bare, "config", "uploadpack.allowFilter", "true")
    git("--git-dir", bare, "config", "uploadpack.allowAnySHA1InWant", "true")


def _pseudo_random(n: int, seed: bytes) -> bytes:
    return hashlib.shake_256(seed).digest(n)


def _big_text(size: int) -> bytes:
    parts = []
    total = 0
    i = 0
    while total < size:
        line = f"{i:08d} the quick brown fox jumps over the lazy dog {i * 7919 % 100003:06d}\n".encode()
        parts.append(line)
        total += len(line)
        i += 1
    data = b"".join(parts)[:size]
    return data[:-1] + b"\n" if data else data


_GITLINK_SHA = hashlib.sha1(b"artifactfs tests: vendor/sub").hexdigest()

_GITMODULES = b"""[submodule "vendor/sub"]
\tpath = vendor/sub
\turl = https://example.invalid/vendor/sub.git
"""


def _sample_content() -> tuple[dict[str, bytes], set[str], dict[str, str], dict[str, str]]:
    files = {
        "README.md": b"# sample\n\nA small repository for the artifactfs tests.\n",
        ".gitmodules": _GITMODULES,
        "src/app.py": b'from lib import util\n\n\ndef main():\n    print(util.greet("world"))\n',
        "src/lib/util.py": b'def greet(name):\n    return f"hello, {name}"\n',
        "src/lib/data.json": b'{"name": "sample", "numbers": [1, 2, 3], "nested": {"ok": true}}\n',
        "bin/run.sh": b'#!/bin/sh\necho "running $0"\n',
        "empty.txt": b"",
        "docs/h\u00e9llo w\u00f6rld.txt": "h\u00e9llo w\u00f6rld \u2014 non-ASCII content\n".encode(),
        "assets/blob.bin": _pseudo_random(300 * 1024, b"artifactfs tests: assets/blob.bin"),
        "assets/big.txt": _big_text(2 * 1024 * 1024),
    }
    executables = {"bin/run.sh"}
    symlinks = {"docs/link-to-readme": "../README.md", "srclink": "src"}
    gitlinks = {"vendor/sub": _GITLINK_SHA}
    return files, executables, symlinks, gitlinks


def _changes(files: Mapping[str, bytes | None], executables: Iterable[str] = (),
             symlinks: Mapping[str, str] | None = None,
             gitlinks: Mapping[str, str] | None = None) -> list[tuple[str, str, bytes | str | None]]:
    execs = set(executables)
    out: list[tuple[str, str, bytes | str | None]] = []
    for path, content in sorted(files.items()):
        out.append((_MODE_EXEC if path in execs else _MODE_FILE, path, content))
    for path, target in sorted((symlinks or {}).items()):
        out.append((_MODE_LINK, path, target.encode("utf-8")))
    for path, sha in sorted((gitlinks or {}).items()):
        out.append((_MODE_GITLINK, path, sha))
    return out


def make_sample_repo(dest_dir: Path, name: str = "sample") -> SampleRepo:
    """Create the bare repository ``dest_dir/<name>.git`` with known content.

    ``main`` has two commits; the first is tagged ``v1`` (annotated tag) and
    the second changes ``README.md`` and ``src/app.py``.  Branch ``feature``
    adds ``feature.txt`` on top of ``main``.  The tree of ``main`` holds
    regular files (including an empty one, one with a space and non-ASCII
    characters in its name, a 300 KiB binary and a 2 MiB text file), the
    executable ``bin/run.sh``, the symlinks ``docs/link-to-readme ->
    ../README.md`` and ``srclink -> src``, and the gitlink ``vendor/sub``
    (described by ``.gitmodules``; its commit exists nowhere).
    """
    bare = Path(dest_dir) / f"{name}.git"
    _init_bare(bare)
    files, executables, symlinks, gitlinks = _sample_content()

    fi = _FastImport()
    first = fi.commit("refs/heads/main", "Initial import\n", BASE_TIME, None,
                      _changes(files, executables, symlinks, gitlinks))
    fi.tag("v1", first, "Version 1\n", BASE_TIME)
    update = {
        "README.md": files["README.md"] + b"\nSecond revision: see src/app.py.\n",
        "src/app.py": files["src/app.py"] + b'\n\nif __name__ == "__main__":\n    main()\n',
    }
    second = fi.commit("refs/heads/main", "Update README and app\n", BASE_TIME + TIME_STEP, first,
                       _changes(update))
    feature = fi.commit("refs/heads/feature", "Add feature.txt\n", BASE_TIME + 2 * TIME_STEP, second,
                        _changes({"feature.txt": b"feature branch only\n"}))
    marks = fi.run(bare)
    files.update(update)
    return SampleRepo(
        bare=bare, head=marks[second], files=files, executables=executables,
        symlinks=symlinks, gitlinks=gitlinks,
        branches={"main": marks[second], "feature": marks[feature]},
        tags={"v1": marks[first]},
        history=[marks[first], marks[second]],
    )


def make_many_files_repo(dest_dir: Path, name: str = "many", files: int = 5000, dirs: int = 50,
                         file_size: int = 400) -> SampleRepo:
    """Create ``dest_dir/<name>.git`` with one commit holding ``files`` text
    files of ``file_size`` bytes spread evenly over ``dirs`` directories
    (``d000/f0000.txt`` ...) plus ``README.md``.  Every file's content is
    different.  Built by a single ``git fast-import`` run."""
    if files < 0 or dirs < 1:
        raise ValueError("need files >= 0 and dirs >= 1")
    bare = Path(dest_dir) / f"{name}.git"
    _init_bare(bare)
    dwidth = max(3, len(str(dirs - 1)))
    fwidth = max(4, len(str(max(files - 1, 0))))
    filler = b"abcdefghijklmnopqrstuvwxyz0123456789 lorem ipsum dolor sit amet\n"
    content: dict[str, bytes] = {
        "README.md": f"# {name}\n\n{files} files in {dirs} directories.\n".encode(),
    }
    for i in range(files):
        path = f"d{i % dirs:0{dwidth}d}/f{i:0{fwidth}d}.txt"
        head = f"{path} #{i}\n".encode()
        reps = file_size // len(filler) + 1
        content[path] = (head + filler * reps)[:file_size]
    fi = _FastImport()
    mark = fi.commit("refs/heads/main", f"Add {files} files\n", BASE_TIME, None, _changes(content))
    sha = fi.run(bare)[mark]
    return SampleRepo(bare=bare, head=sha, files=content, executables=set(), symlinks={},
                      gitlinks={}, branches={"main": sha}, history=[sha])


def make_deep_tree_repo(dest_dir: Path, name: str = "deep", shape: tuple[int, ...] = (8, 6, 9),
                        files_per_dir: int = 7) -> SampleRepo:
    """Create ``dest_dir/<name>.git`` shaped like a real source tree rather than a flat one:
    ``shape`` directories at each level (``p0/m1/l2/`` ...), each directory at every level holding
    ``files_per_dir`` files of sizes from a few bytes to a few KiB (every fifth over 1 KiB), and a
    ``.gitignore`` in every top directory. The default holds 3,425 files in 488 directories below the top."""
    bare = Path(dest_dir) / f"{name}.git"
    _init_bare(bare)
    filler = b"the quick brown fox jumps over the lazy dog 0123456789\n"
    content: dict[str, bytes] = {"README.md": f"# {name}\n".encode()}
    prefixes = ("p", "m", "l", "s", "t")
    dirs = [""]
    for level, count in enumerate(shape):
        dirs += [f"{d}{prefixes[level % len(prefixes)]}{i}/" for d in dirs if d.count("/") == level for i in range(count)]
    serial = 0
    for d in dirs[1:]:
        for f in range(files_per_dir):
            serial += 1
            size = 1024 + 37 * (serial % 97) if serial % 5 == 0 else 5 + 13 * (serial % 61)
            head = f"{d}f{f}.txt #{serial}\n".encode()
            content[f"{d}f{f}.txt"] = (head + filler * (size // len(filler) + 1))[:size]
        if d.count("/") == 1:
            content[f"{d}.gitignore"] = b"*.o\n"
    fi = _FastImport()
    mark = fi.commit("refs/heads/main", "A deep tree\n", BASE_TIME, None, _changes(content))
    sha = fi.run(bare)[mark]
    return SampleRepo(bare=bare, head=sha, files=content, executables=set(), symlinks={},
                      gitlinks={}, branches={"main": sha}, history=[sha])


def make_large_file_repo(dest_dir: Path, name: str, size: int, block: bytes) -> SampleRepo:
    """Create ``dest_dir/<name>.git`` holding ``big.bin`` (``block`` repeated up to ``size``
    bytes: a block under zlib's 32 KiB window keeps the pack small) and ``README.md``."""
    bare = Path(dest_dir) / f"{name}.git"
    _init_bare(bare)
    content = {"README.md": b"one large file\n", "big.bin": (block * (size // len(block) + 1))[:size]}
    fi = _FastImport()
    mark = fi.commit("refs/heads/main", "A large file\n", BASE_TIME, None, _changes(content))
    sha = fi.run(bare)[mark]
    return SampleRepo(bare=bare, head=sha, files=content, executables=set(), symlinks={},
                      gitlinks={}, branches={"main": sha}, history=[sha])


def make_history_repo(dest_dir: Path, name: str = "history", commits: int = 120,
                      hot: str = "src/hot.py") -> SampleRepo:
    """Create ``dest_dir/<name>.git`` whose file ``hot`` changes in every one of ``commits``
    commits (a line added, one rewritten: what blame and log -p have to read), and whose
    ``docs/note-<n>.txt`` changes in every tenth, beside a few files that never change."""
    bare = Path(dest_dir) / f"{name}.git"
    _init_bare(bare)
    content: dict[str, bytes] = {"README.md": f"# {name}\n".encode(), "src/still.py": b"STILL = True\n",
                                 ".gitignore": b"*.pyc\n"}
    lines = [f"line {i}: the first version\n" for i in range(20)]

    def changes(n: int) -> dict[str, bytes]:
        lines.append(f"line {len(lines)}: added by commit {n}\n")
        lines[(7 * n) % len(lines)] = f"line {(7 * n) % len(lines)}: rewritten by commit {n}\n"
        made = {hot: "".join(lines).encode()}
        if n % 10 == 0:
            made[f"docs/note-{n // 10}.txt"] = f"note written by commit {n}\n".encode()
        return made

    return _linear_history(bare, content, commits, changes)


def _linear_history(bare: Path, content: dict[str, bytes], commits: int,
                    changes: Callable[[int], dict[str, bytes]]) -> SampleRepo:  # fmt: skip
    """``commits`` commits on main of ``bare``, in one ``git fast-import`` run: the first adds
    ``content``, and commit ``n`` writes ``changes(n)``."""
    fi = _FastImport()
    parent: str | None = None
    marks = []
    for n in range(commits):
        made: dict[str, bytes | None] = dict(changes(n))
        if n == 0:
            made.update(content)
        content.update({k: v for k, v in made.items() if v is not None})
        parent = fi.commit("refs/heads/main", f"Change {n}\n", BASE_TIME + n * TIME_STEP, parent, _changes(made))
        marks.append(parent)
    shas = fi.run(bare)
    history = [shas[m] for m in marks]
    return SampleRepo(bare=bare, head=history[-1], files=content, executables=set(), symlinks={},
                      gitlinks={}, branches={"main": history[-1]}, history=history)


def make_long_history_repo(dest_dir: Path, name: str = "long", commits: int = 20_000, hot_changes: int = 50,
                           hot: str = "src/hot.py", spread: int = 200) -> SampleRepo:  # fmt: skip
    """Create ``dest_dir/<name>.git`` with a long history, in one ``git fast-import`` run: each
    commit rewrites one of ``spread`` small files under ``log/`` (so history has many trees),
    and ``hot`` changes in ``hot_changes`` commits spread evenly over it (what blame reads)."""
    bare = Path(dest_dir) / f"{name}.git"
    _init_bare(bare)
    content: dict[str, bytes] = {"README.md": f"# {name}\n".encode(), ".gitignore": b"*.pyc\n"}
    hot_lines = [f"line {i}: the first version\n" for i in range(10)]
    every = max(commits // hot_changes, 1)

    def changes(n: int) -> dict[str, bytes]:
        made = {f"log/{n % spread:03d}/entry.txt": f"written by commit {n}\n".encode()}
        if n % every == 0 and n // every < hot_changes:
            hot_lines.append(f"line {len(hot_lines)}: added by commit {n}\n")
            hot_lines[(3 * n) % len(hot_lines)] = f"line {(3 * n) % len(hot_lines)}: rewritten by commit {n}\n"
            made[hot] = "".join(hot_lines).encode()
        return made

    return _linear_history(bare, content, commits, changes)


def add_commit(sample: SampleRepo, files: dict[str, bytes | None], message: str,
               branch: str = "main", *, executables: Iterable[str] = ()) -> str:
    """Commit ``files`` on top of ``branch`` in the bare repository and return
    the new commit's sha.

    A ``None`` value deletes that path; paths in ``executables`` get mode
    100755.  A branch that does not exist yet starts from ``sample.head``.
    When ``branch`` is ``sample.branch`` the ``SampleRepo`` fields describing
    the tree (``head``, ``files``, ...) are updated too.
    """
    ref = f"refs/heads/{branch}"
    got = git("--git-dir", sample.bare, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}",
              check=False)
    parent = got.stdout.decode().strip() if got.returncode == 0 else sample.head
    parent_time = int(_git_out("--git-dir", sample.bare, "log", "-1", "--format=%ct", parent))
    if not message.endswith("\n"):
        message += "\n"
    fi = _FastImport()
    mark = fi.commit(ref, message, parent_time + TIME_STEP, parent, _changes(files, executables))
    sha = fi.run(sample.bare)[mark]
    sample.branches[branch] = sha
    if branch == sample.branch:
        sample.head = sha
        sample.history.append(sha)
        execs = set(executables)
        for path, data in files.items():
            sample.symlinks.pop(path, None)
            sample.gitlinks.pop(path, None)
            if data is None:
                sample.files.pop(path, None)
                sample.executables.discard(path)
            else:
                sample.files[path] = data
                if path in execs:
                    sample.executables.add(path)
                else:
                    sample.executables.discard(path)
    return sha


# --------------------------------------------------------------------------
# server plumbing shared by git:// and http://
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _kill_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate ``proc`` and its process group (it was started with
    ``start_new_session=True``, so the group id is its pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children left in the group (e.g. upload-pack of an open connection).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_HOOK_SCRIPT = """#!/bin/sh
# uploadpack.packObjectsHook of a test git server.  Git runs it as
#   <hook> git pack-objects <options>
# once per pack it sends, i.e. once per fetch transaction.
state={state}
printf '%s\\t%s\\n' "$(pwd)" "$*" >> "$state/pack-objects.log"
if [ -s "$state/delay" ]; then
    sleep "$(cat "$state/delay")"
fi
while [ -e "$state/hold" ]; do
    sleep 0.02
done
if [ -e "$state/broken" ]; then
    echo "test server: remote marked as broken" >&2
    exit 1
fi
if [ -s "$state/hold-large" ]; then
    # pack-objects reads what to pack on standard input, a line per object wanted: a pack of
    # more than that many waits, and says so, until the file goes.
    input=$(mktemp)
    cat > "$input"
    if [ "$(wc -l < "$input")" -gt "$(cat "$state/hold-large")" ]; then
        touch "$state/holding-large"
        while [ -e "$state/hold-large" ]; do
            sleep 0.02
        done
    fi
    "$@" < "$input"
    code=$?
    rm -f "$input"
    exit $code
fi
exec "$@"
"""


class _PackHook:
    """State directory with the pack-objects hook, its log and control files,
    and the global git config that enables it."""

    def __init__(self, state_dir: Path | None, prefix: str) -> None:
        if state_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix=prefix))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        else:
            self.dir = Path(state_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.dir = self.dir.resolve()
        self.log = self.dir / "pack-objects.log"
        self.delay_file = self.dir / "delay"
        self.broken_file = self.dir / "broken"
        self.hold_file = self.dir / "hold"
        self.script = self.dir / "pack-objects-hook.sh"
        self.config = self.dir / "gitconfig"
        self.script.write_text(_HOOK_SCRIPT.format(state=shlex.quote(str(self.dir))))
        self.script.chmod(0o755)
        self.log.touch()
        cfg_env = git_env()
        for key, value in (
            # Run through "sh -c", so quote paths with odd characters.
            ("uploadpack.packObjectsHook", shlex.quote(str(self.script))),
            ("uploadpack.allowFilter", "true"),
            ("uploadpack.allowAnySHA1InWant", "true"),
            ("safe.directory", "*"),
        ):
            git("config", "--file", self.config, key, value, env=cfg_env)

    def env(self) -> dict[str, str]:
        """Minimal environment for server-side git processes."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(self.dir),
            "GIT_CONFIG_GLOBAL": str(self.config),
            "GIT_CONFIG_NOSYSTEM": "1",
            "LC_ALL": "C",
        }
        for key in ("TMPDIR", "GIT_EXEC_PATH"):
            if key in os.environ:
                env[key] = os.environ[key]
        return env

    def log_lines(self) -> list[tuple[str, str]]:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            cwd, _, args = line.partition("\t")
            out.append((cwd, args))
        return out

    def count(self, repo: str | None = None) -> int:
        lines = self.log_lines()
        if repo is None:
            return len(lines)
        repo = repo.strip("/")
        return sum(1 for cwd, _ in lines if cwd == repo or cwd.endswith("/" + repo))

    def reset(self) -> None:
        self.log.write_text("")

    def set_delay(self, seconds: float) -> None:
        if seconds and seconds > 0:
            self.delay_file.write_text(f"{seconds:.3f}\n")
        else:
            self.delay_file.unlink(missing_ok=True)

    def set_broken(self, flag: bool) -> None:
        if flag:
            self.broken_file.write_text("broken\n")
        else:
            self.broken_file.unlink(missing_ok=True)

    def set_held(self, flag: bool) -> None:
        if flag:
            self.hold_file.touch()
        else:
            self.hold_file.unlink(missing_ok=True)

    def set_held_large(self, objects: int | None) -> None:
        (self.dir / "holding-large").unlink(missing_ok=True)
        if objects is None:
            (self.dir / "hold-large").unlink(missing_ok=True)
        else:
            (self.dir / "hold-large").write_text(f"{objects}\n")

    def holding_large(self) -> bool:
        return (self.dir / "holding-large").exists()


# --------------------------------------------------------------------------
# git://
# --------------------------------------------------------------------------


class _PackCountingServer:
    """What both test servers share: a pack-objects hook that counts every fetch transaction
    served (and can break them), and start/stop as a context manager."""

    _hook: _PackHook

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def state_dir(self) -> Path:
        return self._hook.dir

    def fetch_count(self, repo: str | None = None) -> int:
        """Packs served since the last reset (optionally only for the repository directory
        ``repo``, e.g. ``"sample.git"``): one per fetch transaction that transferred objects."""
        return self._hook.count(repo)

    def fetch_log(self) -> list[tuple[str, str]]:
        """``(repository dir, pack-objects command line)`` per pack served."""
        return self._hook.log_lines()

    def reset_count(self) -> None:
        self._hook.reset()

    def set_broken(self, flag: bool) -> None:
        """Make every pack fail (the hook exits 1 before pack-objects runs)."""
        self._hook.set_broken(flag)


class GitDaemon(_PackCountingServer):
    """``git daemon`` serving every repository under ``base`` on 127.0.0.1.

    ``fetch_count()`` is the number of packs served since the last
    ``reset_count()`` -- one per clone, ``git fetch`` or lazy fetch that
    transferred objects.  ``set_delay`` makes every pack start ``seconds``
    late; ``set_broken(True)`` makes every fetch fail (the hook exits 1 before
    ``pack-objects`` runs).  ``stop()``/``start()`` restart on the same port.
    """

    def __init__(self, base: Path, *, state_dir: Path | None = None, port: int | None = None) -> None:
        self.base = Path(base).resolve()
        self._hook = _PackHook(state_dir, "gitdaemon-")
        self.port: int = port or 0
        self._fixed_port = port is not None
        self._proc: subprocess.Popen | None = None
        self._reaper: weakref.finalize | None = None
        self.daemon_log = self._hook.dir / "daemon.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, repo_dir_name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{repo_dir_name.lstrip('/')}"

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        attempts = 1 if (self._fixed_port or self.port) else 3
        last_error = ""
        for _ in range(attempts):
            if not self.port:
                self.port = _free_port()
            error = self._spawn(timeout)
            if error is None:
                return
            last_error = error
            if attempts > 1:
                self.port = 0
        raise RuntimeError(f"git daemon did not start on port {self.port}:\n{last_error}")

    def _spawn(self, timeout: float) -> str | None:
        cmd = ["git", "daemon", "--reuseaddr", f"--base-path={self.base}", "--export-all",
               "--enable=upload-pack", "--listen=127.0.0.1", f"--port={self.port}",
               "--informative-errors", "--verbose", str(self.base)]
        with open(self.daemon_log, "ab") as log:
            self._proc = subprocess.Popen(cmd, env=self._hook.env(), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log, cwd=self._hook.dir,
                                          start_new_session=True)
        # Safety net for a daemon nobody stopped: killed at garbage collection
        # or interpreter exit.
        self._reaper = weakref.finalize(self, _kill_group, self._proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _port_open(self.port):
                return None
            time.sleep(0.05)
        proc, self._proc = self._proc, None
        _kill_group(proc)
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None
        return self.daemon_log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_group(proc)
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None

    def set_delay(self, seconds: float) -> None:
        """Every pack starts ``seconds`` late."""
        self._hook.set_delay(seconds)

    def hold(self) -> None:
        """Every pack waits from now on until ``release()``: a transfer stays in flight for as
        long as a test needs, however slow the machine."""
        self._hook.set_held(True)

    def release(self) -> None:
        self._hook.set_held(False)

    def hold_large(self, objects: int) -> None:
        """Every pack of more than ``objects`` objects waits from now on until
        ``release_large()``; smaller ones go through."""
        self._hook.set_held_large(objects)

    def holding_large(self) -> bool:
        """Whether a large pack is waiting now."""
        return self._hook.holding_large()

    def release_large(self) -> None:
        self._hook.set_held_large(None)


# --------------------------------------------------------------------------
# http:// (smart HTTP through git http-backend)
# --------------------------------------------------------------------------


@dataclass
class HttpRequestRecord:
    method: str
    path: str
    query: str
    #: an Authorization header was sent
    credentials_sent: bool
    #: the Authorization header carried the right username and password
    authorized: bool
    #: HTTP status answered (0 until the answer is sent)
    status: int = 0
    #: request's Content-Encoding header ("gzip" for large git requests)
    content_encoding: str = ""
    #: the request body came with Transfer-Encoding: chunked
    chunked: bool = False
    #: bytes of request body received (after de-chunking, before inflating)
    body_length: int = 0


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gitremote-test-http/1"
    timeout = 60

    def setup(self) -> None:
        super().setup()
        self.server.owner._conn_opened(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._conn_closed(self.connection)  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self.server.owner._handle(self)  # type: ignore[attr-defined]

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    headers = handler.headers
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while True:
            size_line = handler.rfile.readline()
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # trailers up to the empty line
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        return b"".join(chunks)
    length = int(headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _split_cgi(output: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
    ends = [(i, n) for i, n in ((output.find(b"\r\n\r\n"), 4), (output.find(b"\n\n"), 2)) if i >= 0]
    if not ends:
        return 502, "Bad Gateway", [], output
    idx, n = min(ends)
    head, body = output[:idx], output[idx + n:]
    status, reason = 200, "OK"
    headers = []
    for line in head.decode("latin-1").splitlines():
        if not line.strip():
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key.lower() == "status":
            code, _, reason = value.partition(" ")
            status = int(code)
        else:
            headers.append((key, value))
    return status, reason, headers, body


class GitHttpServer(_PackCountingServer):
    """Smart-HTTP git server for the repositories under ``base``.

    Each request runs ``git http-backend`` as a CGI child.  Every request must
    carry HTTP Basic credentials ``username``/``password``; otherwise the answer
    is ``401`` with ``WWW-Authenticate: Basic realm="git"``.  ``requests``
    records every request (:class:`HttpRequestRecord`).  Like
    :class:`GitDaemon` it counts packs (``fetch_count``) and supports
    ``set_broken``; ``set_delay`` instead holds back every HTTP answer.
    """

    def __init__(self, base: Path, username: str, password: str, *,
                 state_dir: Path | None = None, port: int | None = None) -> None:
        self.base = Path(base).resolve()
        self.username = username
        self.password = password
        self.port: int = port or 0
        self.requests: list[HttpRequestRecord] = []
        self._hook = _PackHook(state_dir, "githttp-")
        self.backend_log = self._hook.dir / "http-backend.log"
        self._expected_auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self._delay = 0.0
        self._reject_authorized = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._children: set[subprocess.Popen] = set()
        self._conns: set[socket.socket] = set()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def url(self, repo_dir_name: str, with_credentials: bool = False) -> str:
        auth = ""
        if with_credentials:
            auth = (urllib.parse.quote(self.username, safe="") + ":"
                    + urllib.parse.quote(self.password, safe="") + "@")
        return f"http://{auth}127.0.0.1:{self.port}/{repo_dir_name.lstrip('/')}"

    def start(self) -> None:
        if self._server is not None:
            return
        self._stopping.clear()
        server = _HttpServer(("127.0.0.1", self.port), _HttpHandler)
        server.owner = self  # type: ignore[attr-defined]
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"git-http-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            children = list(self._children)
            conns = list(self._conns)
        for proc in children:
            _kill_group(proc)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def set_delay(self, seconds: float) -> None:
        """Sleep ``seconds`` before answering each request."""
        self._delay = max(0.0, float(seconds))

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def reject_authorized(self, count: int = 1) -> None:
        """Answer the next ``count`` requests that carry the right credentials with
        ``401`` anyway, as a server with a transient authentication failure does.
        Their records keep ``authorized=True`` and get ``status=401``."""
        with self._lock:
            self._reject_authorized = int(count)

    # internals
    def _conn_opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)

    def _conn_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        split = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(split.path)
        auth = h.headers.get("Authorization")
        rec = HttpRequestRecord(method=h.command, path=path, query=split.query,
                                credentials_sent=auth is not None,
                                authorized=auth is not None and auth.strip() == self._expected_auth,
                                content_encoding=h.headers.get("Content-Encoding", ""),
                                chunked="chunked" in h.headers.get("Transfer-Encoding", "").lower())
        with self._lock:
            self.requests.append(rec)
        try:
            body = _read_body(h)
        except (OSError, ValueError):
            rec.status = 400
            h.close_connection = True
            return
        rec.body_length = len(body)
        if self._delay and self._stopping.wait(self._delay):
            self._send(h, rec, 503, "Service Unavailable", [], b"server stopping\n")
            h.close_connection = True
            return
        with self._lock:
            rejected = rec.authorized and self._reject_authorized > 0
            if rejected:
                self._reject_authorized -= 1
        if not rec.authorized or rejected:
            self._send(h, rec, 401, "Unauthorized",
                       [("WWW-Authenticate", 'Basic realm="git"'), ("Content-Type", "text/plain")],
                       b"authentication required\n")
            return
        status, reason, headers, payload = self._run_backend(h, path, split.query, body)
        self._send(h, rec, status, reason, headers, payload)

    def _send(self, h: BaseHTTPRequestHandler, rec: HttpRequestRecord, status: int, reason: str,
              headers: list[tuple[str, str]], payload: bytes) -> None:
        rec.status = status
        try:
            h.send_response(status, reason)
            for key, value in headers:
                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                    h.send_header(key, value)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            h.wfile.flush()
        except OSError:
            h.close_connection = True

    def _run_backend(self, h: BaseHTTPRequestHandler, path: str, query: str,
                     body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        env = self._hook.env()
        env.update({
            "GIT_PROJECT_ROOT": str(self.base),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": h.request_version,
            "SERVER_SOFTWARE": h.server_version,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": str(self.port),
            "REQUEST_METHOD": h.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": h.headers.get("Content-Type", ""),
            "REMOTE_ADDR": h.client_address[0],
            "REMOTE_USER": self.username,
            "AUTH_TYPE": "Basic",
        })
        if h.command == "POST":
            env["CONTENT_LENGTH"] = str(len(body))
        for key, value in h.headers.items():
            lk = key.lower()
            if lk in ("authorization", "content-type", "content-length", "transfer-encoding",
                      "connection", "expect"):
                continue
            # Content-Encoding: gzip is passed on: http-backend inflates it.
            env["HTTP_" + key.upper().replace("-", "_")] = value
        with open(self.backend_log, "ab") as log:
            proc = subprocess.Popen(["git", "http-backend"], env=env, cwd=self.base,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                    start_new_session=True)
            with self._lock:
                self._children.add(proc)
            try:
                out, _ = proc.communicate(body, timeout=300)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return 504, "Gateway Timeout", [], b"http-backend timed out\n"
            finally:
                with self._lock:
                    self._children.discard(proc)
        if proc.returncode and not out:
            return 500, "Internal Server Error", [], b"http-backend failed\n"
        return _split_cgi(out)


# --------------------------------------------------------------------------
# a remote that hangs
# --------------------------------------------------------------------------


class HungRemote:
    """A TCP listener on 127.0.0.1 that accepts every connection and never answers: a remote
    whose server hangs.  ``accepted`` counts the connections ever taken; ``close()`` (or
    leaving the ``with`` block) drops them all, as a restarted server would."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._accepted = 0
        self._thread = threading.Thread(target=self._accept, name="hung-remote", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, repo_dir_name: str) -> str:
        """A smart-HTTP URL on this listener: git's remote helper connects and waits forever."""
        return f"http://{self.address}/{repo_dir_name.lstrip('/')}"

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self._conns.append(conn)
                self._accepted += 1

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
