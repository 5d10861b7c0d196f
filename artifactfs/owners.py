"""Repositories that belong to a user of the host (add-repo --owner USER).

The owner's git must work in the mount: git refuses a work tree or git directory another user
owns ("dubious ownership"), so the mounted files and the git directory are the owner's. Once they
are, their content is the owner's to change: the git config (core.sshCommand, credential
helpers, core.fsmonitor), hooks (reference-transaction runs on every ref update), and the
directories themselves (a directory swapped for a symbolic link). Root must then never act on
them with root's rights:

- every git command and every file operation on an owned git directory runs as the owner, in a
  child process that has given up root (`call_as`, `run_as_kwargs`);
- the one change of ownership (`give_to`) is made while the owner cannot reach the directory yet:
  a clone staged under the root-only temporary root, an overlay directory inside a root-only
  state directory;
- the mount process gives up root for good once it has mounted (`become`): it reads the git
  directory and the overlay with the owner's rights only.
"""
from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .model import (
    ArtifactError,
    GitError,
    InvalidInput,
    ObjectMissing,
    Owner,
    RefNotFound,
    RemoteUnreachable,
    RepoState,
    SourceUnverified,
)

T = TypeVar("T")
# The errors a child may report back, by name, raised again in the parent: anything else arrives
# as a plain GitError.
REPORTED_ERRORS: dict[str, type[ArtifactError]] = {
    cls.__name__: cls for cls in (GitError, RefNotFound, RemoteUnreachable, ObjectMissing, InvalidInput, SourceUnverified)
}


def lookup_owner(user: str) -> Owner:
    """The user named `user` (or with that uid) on this host; InvalidInput if there is none."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise InvalidInput(f"--owner {user}: no such user on this host (see getent passwd)") from None
    if entry.pw_uid == 0:
        raise InvalidInput(f"--owner {user}: that is root, whom every repository belongs to already; leave --owner out")
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)


def owner_of(uid: int | None, gid: int | None) -> Owner | None:
    """The owner a repository was registered with, as the host knows them now."""
    if uid is None:
        return None
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return Owner(name, uid, gid if gid is not None else uid)


def git_dir_owner(repo: RepoState) -> Owner | None:
    """Whose a repository's git directory is (add-repo --owner): every git command on it runs as
    them. A prepared git directory is someone else's, used as root."""
    return None if repo.prepared_gitdir else owner_of(repo.owner_uid, repo.owner_gid)


def home_of(owner: Owner) -> str:
    try:
        return pwd.getpwuid(owner.uid).pw_dir or "/"
    except KeyError:
        return "/"


def owner_env(owner: Owner, env: dict[str, str]) -> dict[str, str]:
    """`env` for a process of the owner: their home (git reads its config there, and root's is
    not theirs to read), their name."""
    return {**env, "HOME": home_of(owner), "USER": owner.name, "LOGNAME": owner.name}


def run_as_kwargs(owner: Owner) -> dict[str, Any]:
    """subprocess arguments that start a process as the owner, with no group of root's."""
    return {"user": owner.uid, "group": owner.gid, "extra_groups": []}


def become(owner: Owner) -> None:
    """Give up root for good: the owner's uid and gid, no supplementary groups. The kernel then
    marks the process not dumpable, so the owner cannot attach to it."""
    os.setgroups([])
    os.setgid(owner.gid)
    os.setuid(owner.uid)
    if os.getuid() != owner.uid or os.geteuid() != owner.uid or os.getegid() != owner.gid:
        raise PermissionError(f"could not become {owner.name}")
    os.environ.update(owner_env(owner, {}))
    _point_libgit2_home(home_of(owner))


def _point_libgit2_home(home: str) -> None:
    """libgit2 looked up root's home once, at load: it must read the owner's global config, not
    fail on root's. And it takes the directory above a git directory not named .git for its work
    tree, whose owner (root: our git root) is not the owner's; the check guards against
    repositories found by walking up, and ours are derived from the state root and the name."""
    import pygit2

    levels = pygit2.enums.ConfigLevel
    pygit2.settings.search_path[levels.GLOBAL] = home
    pygit2.settings.search_path[levels.XDG] = os.path.join(home, ".config", "git")
    pygit2.option(pygit2.enums.Option.SET_OWNER_VALIDATION, False)


def give_to(path: Path, owner: Owner) -> None:
    """Make a directory tree the owner's, bottom up, links not followed. Only for a tree the owner
    cannot reach yet: under a root-only directory, so that nothing in it changes meanwhile."""
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), owner.uid, owner.gid)
        os.lchown(dirpath, owner.uid, owner.gid)


def call_as(owner: Owner | None, action: Callable[[], T]) -> T:
    """Run `action` as the owner, in a forked child that has given up root; return what it
    returns (JSON), or raise the git error it raised. Without an owner, run it here.

    A child, not this process: a worker or the CLI must stay root for the next repository. Its
    answer comes back as JSON, never as a pickle: the child ran the owner's configuration."""
    if owner is None:
        return action()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_end)
            become(owner)
            answer: dict[str, Any] = {"value": action()}
        except ArtifactError as exc:
            answer = {"error": type(exc).__name__, "message": str(exc), "transient": getattr(exc, "transient", False)}
        except BaseException as exc:  # noqa: BLE001 (reported to the parent, which raises it)
            answer = {"error": "failure", "message": f"{type(exc).__name__}: {exc}", "transient": False}
            code = 1
        try:
            with os.fdopen(write_end, "w") as out:
                json.dump(answer, out)
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as reply:
        text = reply.read()
    os.waitpid(pid, 0)
    try:
        answer = json.loads(text)
    except ValueError:
        raise ArtifactError(f"a process running as {owner.name} died without an answer") from None
    if "error" in answer:
        cls = REPORTED_ERRORS.get(answer["error"], GitError)
        if issubclass(cls, GitError):
            raise cls(str(answer["message"]), transient=bool(answer.get("transient")))
        raise cls(str(answer["message"]))
    return answer["value"]  # type: ignore[no-any-return]
